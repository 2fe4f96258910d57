"""The kvxfer wire protocol, free of I/O: frames <-> bytes. See frames.py for the layout."""

from .connection import CLOSED, NEED_DATA, Connection, Event, PayloadData
from .frames import (E_AUTH, E_BACKLOG, E_CLOSING, E_CODEC, E_INTERNAL, E_LAYOUT, E_PROTOCOL,
                     E_RANGE, E_SIZE, HEADER_SIZE, MAGIC, NOTE_FINISHED, NOTE_LAYERS, NOTE_USER,
                     VERSION, Auth, Close, Completion, Data, Encoding, Error, Frame, Hello, Note,
                     ReadRequest, Write, decode_note, encode_note)

__all__ = [
    "Auth", "CLOSED", "Close", "Completion", "Connection", "Data", "E_AUTH", "E_BACKLOG",
    "E_CLOSING", "E_CODEC", "E_INTERNAL", "E_LAYOUT", "E_PROTOCOL", "E_RANGE", "E_SIZE",
    "Encoding", "Error", "Event", "Frame", "HEADER_SIZE", "Hello", "MAGIC", "NEED_DATA",
    "NOTE_FINISHED", "NOTE_LAYERS", "NOTE_USER", "Note", "PayloadData", "ReadRequest",
    "VERSION", "Write", "decode_note", "encode_note",
]
