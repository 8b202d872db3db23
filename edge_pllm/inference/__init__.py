"""Inference: the models the device runs, and the bundle that holds them.

bundle          a bundle's manifest and files, checked before use
llm             llama.cpp through llama-cpp-python, soft tokens injected
embedder        the sentence encoder on onnxruntime
wordpiece       BERT's WordPiece tokenizer, without `tokenizers`
onnx_session    onnxruntime sessions, their optimized graph kept beside the model
token_rows      a model's token-embedding rows, read from its GGUF as llama.cpp reads them
model_registry  a GGUF the person already has, used in place of the bundle's LLM
"""
