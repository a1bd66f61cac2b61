"""Bodies shared by every domain's routes: the error body of ``errors.py``'s one error table."""

from __future__ import annotations

from pydantic import BaseModel


# Every refusal: a readable ``error`` and a stable ``code`` (a comment, not a docstring, which
# would change the OpenAPI document's schema).
class ErrorOut(BaseModel):
    error: str
    code: str
