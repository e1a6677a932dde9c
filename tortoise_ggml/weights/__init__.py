"""The GGUF side: the component registry, checkpoint schemas, the converter and the model file loader."""
