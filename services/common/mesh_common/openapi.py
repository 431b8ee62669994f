"""What the shared middlewares may answer, for each service's OpenAPI document.

Every service is a ``service_app``: any operation may get the problem
middleware's 503 (a dependency slow or away, or the request's deadline),
and any with a body its 400, 413 and 415. One that commits a transaction
(``mesh_common.transactions``) may get its 500 ``OUTCOME_UNKNOWN``, which
tells the client to read the change back rather than send it again. Each
document has them added here, once, so that none forgets one. The problems'
schema is the document's own ``#/components/schemas/Problem``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

BODY_ANSWERS = {
    "400": "MALFORMED_BODY: the body does not decode as its Content-Encoding or framing says",
    "413": "PAYLOAD_TOO_LARGE: the body is over its limit (64 KiB)",
    "415": "UNSUPPORTED_MEDIA_TYPE: the body is not application/json, or in a charset, or at the edge a content"
    " coding, not known",
}
OUTCOME_UNKNOWN_ANSWER = (
    "OUTCOME_UNKNOWN: the commit's answer was lost and its outcome could not be asked; the change may or may"
    " not have been made: read it back before sending it again (no Retry-After)"
)


def problem_answer(description: str) -> dict[str, Any]:
    """A response of the document's: problem+json, as ``description`` says."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": description, "content": {"application/problem+json": {"schema": schema}}}


def with_shared_answers(
    paths: dict[str, Any],
    *,
    unavailable: str,
    answered_from_memory: Collection[str] = (),
    committing: Collection[tuple[str, str]] = (),
) -> dict[str, Any]:
    """A copy of ``paths`` with the shared answers added to each operation.

    ``unavailable`` describes the 503, put before an operation's own 503 if
    it has one; paths in ``answered_from_memory`` touch no dependency and
    get none. The operations in ``committing``, as (method, path), get the
    500 ``OUTCOME_UNKNOWN``; one that is not in ``paths`` is an error.
    """
    paths = copy.deepcopy(paths)
    if unknown := sorted(set(committing) - {(m, p) for p, item in paths.items() for m in item}):
        raise ValueError(f"committing operations not in the paths: {unknown}")
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            if (method, path) in committing:
                responses["500"] = problem_answer(OUTCOME_UNKNOWN_ANSWER)
            if "requestBody" in operation:
                for status, description in BODY_ANSWERS.items():
                    responses.setdefault(status, problem_answer(description))
            if path not in answered_from_memory:
                own = responses.get("503")
                description = unavailable if own is None else f"{unavailable}; {own['description']}"
                responses["503"] = problem_answer(description)
            operation["responses"] = dict(sorted(responses.items()))
    return paths
