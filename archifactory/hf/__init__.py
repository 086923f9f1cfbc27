"""Hugging Face format: `config` (ArchiFactoryConfig), `model` (the PreTrainedModel wrapper, save/load of a
`model/` folder) and `auto` (registration with transformers' Auto classes on `import archifactory`).

Kept empty on purpose: `import archifactory` imports `hf.auto`, which must not load transformers' modeling code.
"""
