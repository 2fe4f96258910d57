"""Engine connectors. Each engine is imported only by its own module here
(``kvxfer.integrations.vllm``); importing kvxfer never imports an engine."""
