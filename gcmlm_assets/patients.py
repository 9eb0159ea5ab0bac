"""Patient identifiers: the one rule that decides what may become a partition and a path."""

from __future__ import annotations

import re

PATIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidPatientId(ValueError):
    pass


def patient_id_problem(candidate: str) -> str | None:
    """Why `candidate` is not a valid patient id, or None when it is."""
    if not isinstance(candidate, str):
        return f"not a string ({type(candidate).__name__})"
    if candidate == "":
        return "empty"
    if not candidate.isascii():
        return "contains non-ASCII characters"
    if "/" in candidate or "\\" in candidate:
        return "contains a path separator"
    if candidate in (".", "..") or candidate.startswith("."):
        return "starts with '.'"
    if ".." in candidate:
        # Harmless as one path component, but it reads as a parent-folder step in every path shown.
        return "contains '..'"
    if any(ch.isspace() for ch in candidate):
        return "contains whitespace"
    if len(candidate) > 64:
        return f"longer than 64 characters ({len(candidate)})"
    if not PATIENT_ID_PATTERN.fullmatch(candidate):
        return "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"
    return None


def validate_patient_id(candidate: str, *, where: str = "") -> str:
    """Return `candidate` unchanged, or raise InvalidPatientId naming `where` and the reason."""
    problem = patient_id_problem(candidate)
    if problem:
        place = f" ({where})" if where else ""
        raise InvalidPatientId(f"invalid patient id {candidate!r}{place}: {problem}")
    return candidate
