"""The CUDA path: kv_pack.cu compiled at run time with cupy (NVRTC), launched once per call.

The kernel source ships inside the package (``kvxfer/csrc/kv_pack.cu``; the top-level
``csrc/kv_pack.cu`` is a link to it), so nothing is compiled at install time. The module
is compiled on first use per device and cached. cupy is imported only here, lazily:
``import kvxfer.packing`` never imports it. The launch goes on torch's current stream,
so it orders with the engine's own work on that stream like any torch op.
"""

from __future__ import annotations

import threading
import weakref
from importlib import resources
from typing import Any

import torch

from ..errors import BackendUnavailable
from ..layout import KVLayout
from .pack_plan import PackPlan, widest_word

KERNEL_FILE = "kv_pack.cu"
NVRTC_OPTIONS: tuple[str, ...] = ()  # NVRTC defaults (C++17); cupy adds -arch and -ftz
THREADS = 256  # per CTA
CTAS_PER_SM = 4  # grid-stride over rows; 48 regs x 256 threads: 5 CTAs fit an SM
WIDTHS = (16, 8, 4, 2, 1)

_lock = threading.Lock()
_modules: dict[int, Any] = {}  # device index -> cupy RawModule
# layout -> {layer tuple: device table of region bases and strides}; dies with the layout
_tables: "weakref.WeakKeyDictionary[KVLayout, dict[tuple[int, ...], torch.Tensor]]" = \
    weakref.WeakKeyDictionary()


def kernel_source() -> str:
    """The exact text handed to NVRTC (the packaged ``kv_pack.cu``)."""
    return resources.files("kvxfer").joinpath("csrc", KERNEL_FILE).read_text()


def _cupy() -> Any:
    """Import cupy, or raise BackendUnavailable saying why the kernel cannot run here."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("cuda-packing", "torch sees no CUDA device", extra="cuda")
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install failing at import
        raise BackendUnavailable("cuda-packing", f"cupy is not importable ({exc})",
                                 extra="cuda") from exc
    return cupy


def available() -> bool:
    """Whether the CUDA kernel can run here (cupy importable and a CUDA device present)."""
    try:
        _cupy()
    except BackendUnavailable:
        return False
    return True


def _module(device: int) -> Any:
    cupy = _cupy()
    with _lock:
        mod = _modules.get(device)
        if mod is None:
            with cupy.cuda.Device(device):
                mod = cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)
                mod.compile()
            _modules[device] = mod
        return mod


def _table(layout: KVLayout, plan: PackPlan, device: torch.device) -> torch.Tensor:
    """u64[2R] on the device: the plan's region base addresses, then their block strides."""
    with _lock:
        per_layout = _tables.setdefault(layout, {})
        table = per_layout.get(plan.layers)
        if table is None:
            values = [r.base for r in plan.regions] + [r.block_stride for r in plan.regions]
            table = torch.tensor(values, dtype=torch.int64).to(device)  # addresses < 2**63
            # a pageable upload may still be in flight when .to() returns; later launches
            # can run on other streams, so wait for it once, here
            torch.cuda.current_stream(device).synchronize()
            per_layout[plan.layers] = table
        return table


def _packed_address(buf: torch.Tensor) -> int:
    """A device-usable address of the packed buffer (mapped pointer for pinned host)."""
    if buf.device.type == "cuda":
        return buf.data_ptr()
    attrs = _cupy().cuda.runtime.pointerGetAttributes(buf.data_ptr())
    return int(attrs.devicePointer)


def access_width(plan: PackPlan, packed_addr: int) -> int:
    """The widest word (16, 8, 4, 2, 1 bytes) that every address and length allows."""
    values = [packed_addr, plan.seg_off, plan.seg_pitch, plan.seg_bytes]
    for r in plan.regions:
        values += [r.base, r.block_stride]
    return widest_word(values, WIDTHS)


def launch_config(plan: PackPlan, width: int, num_sms: int) -> tuple[int, int]:
    """``(grid, threads)``: as many CTAs as rows need, capped at CTAS_PER_SM per SM."""
    words = plan.seg_bytes // width
    tpr = 1
    while tpr < words and tpr < THREADS:
        tpr <<= 1
    rows = len(plan.regions) * plan.num_ids * plan.num_segs
    groups = THREADS // tpr
    return max(1, min(-(-rows // groups), CTAS_PER_SM * num_sms)), THREADS


def kernel_args(plan: PackPlan, table_addr: int, ids_addr: int, packed_addr: int) -> tuple:
    """The kernels' arguments, typed as their C signature (u64 x3, i32 x3, i64 x3)."""
    import numpy as np

    return (np.uint64(table_addr), np.uint64(ids_addr), np.uint64(packed_addr),
            np.int32(len(plan.regions)), np.int32(plan.num_ids), np.int32(plan.num_segs),
            np.int64(plan.seg_off), np.int64(plan.seg_pitch), np.int64(plan.seg_bytes))


def run(layout: KVLayout, plan: PackPlan, packed: torch.Tensor, gather: bool) -> None:
    """Launch the pack (gather) or unpack (scatter) kernel for a validated plan.

    Raises:
        BackendUnavailable: cupy missing or no CUDA device (extra ``cuda``).
    """
    if plan.nbytes == 0:
        return
    cupy = _cupy()
    device = layout.device  # a CUDA tensor's device always carries its index
    mod = _module(device.index)
    table = _table(layout, plan, device)
    ids = plan.ids.to(device, non_blocking=True)
    addr = _packed_address(packed)
    width = access_width(plan, addr)
    fn = mod.get_function(f"kv_{'pack' if gather else 'unpack'}_w{width}")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    grid, threads = launch_config(plan, width, num_sms)
    args = kernel_args(plan, table.data_ptr(), ids.data_ptr(), addr)
    with cupy.cuda.Device(device.index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        fn((grid,), (threads,), args, stream=stream)
    # `ids` may be freed on return: torch's allocator hands its memory out again only to
    # work ordered after this launch on the same stream.
