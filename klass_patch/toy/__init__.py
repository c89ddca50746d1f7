"""Stand-ins with upstream's interfaces (not its code) and a tiny deterministic model, for the demo and tests.

- ``llada_generate``: a ``generate.py`` with the signature of LLaDA's 2025-10 version.
- ``dream_generation``: a ``generation_utils.py`` with Dream's ``DreamGenerationMixin`` interface.
- ``models``: ``ToyDenoiser``, a weight-free model whose predictions firm up as neighbours get decided.
"""
