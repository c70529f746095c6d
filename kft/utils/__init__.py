"""Small helpers every package may use: `offline` (no-network errors),
`safe_npz` (npz files read without pickle), `validation` (strict pydantic
models). Imports: nothing from kft.
"""

__all__ = []
