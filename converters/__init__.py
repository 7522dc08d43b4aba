"""Export formats, one module per format (safetensors, onnx, gguf), each with ``export(...)`` and the runtime
call ``verify`` needs. Converters do layout only (transposes, quantization), never adapter math."""
