"""Fuzzing every route from the app's own OpenAPI schema (schemathesis, in-process ASGI).

Every operation gets schema-valid and schema-breaking inputs (wrong types, huge and negative numbers,
unicode, missing and extra fields): no answer is a 5xx, no body carries a traceback, and every
refusal is a 4xx whose body names the field it refuses. The app runs the tiny model under tight
limits, so what the fuzzer gets accepted costs a few steps of 8..64-pixel images.

T2I_FUZZ_EXAMPLES sets the examples per operation (default 25; docs/guarantees.md gives a run's count).
"""

from __future__ import annotations

import collections
import json
import os
import re

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from srv import config  # noqa: E402
from t2i.server import Limits, create_app  # noqa: E402

EXAMPLES = int(os.environ.get("T2I_FUZZ_EXAMPLES", "25"))
TIGHT = Limits(max_side=64, max_steps=3, max_images=2, max_pixel_steps=64 * 64 * 3 * 2, max_body=256 * 1024,
               max_prompt=2000)
SEEN: collections.Counter = collections.Counter()  # status codes answered, for the figures

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\.py\", line \d+")


class Late:
    """An ASGI app that forwards HTTP to `target`, set by the fixture below. The schema is read (at collection)
    from an app that never starts; the requests go to one started over the tiny model. Lifespan events
    stop here: the fixture's TestClient runs the real app's."""

    target = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await self.target(scope, receive, send)


LATE = Late()
LATE.target = create_app()  # routes and models only: this one never starts or loads anything
schema = schemathesis.openapi.from_asgi("/openapi.json", LATE)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES)
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])


@pytest.fixture(scope="module", autouse=True)
def fuzzed_app(tiny_sd, lora_dir, model_dir, embedding_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    app = create_app(config(tiny_sd, lora_dir=lora_dir, model_dir=model_dir, embedding_dir=embedding_dir,
                            out=tmp_path_factory.mktemp("fuzz-out"), queue=10_000, limits=TIGHT))
    with TestClient(app):  # runs the lifespan: the worker and the first load
        LATE.target = app
        yield app
    figures = os.environ.get("T2I_FIGURES_DIR")
    if figures:
        with open(os.path.join(figures, "fuzz.json"), "w") as f:
            json.dump({"examples_per_operation": EXAMPLES, "requests": sum(SEEN.values()),
                       "statuses": dict(sorted(SEEN.items()))}, f)


def schema_fields(spec: dict) -> dict[tuple[str, str], set[str]]:
    """(METHOD, path) -> every property name its request body's schema has (at any depth): a refusal of a
    missing field names a field the request did not send."""
    components = spec.get("components", {}).get("schemas", {})

    def walk(node, seen: set, out: set):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                walk(components.get(ref.rsplit("/", 1)[-1], {}), seen, out)
            out.update(node.get("properties", {}) if isinstance(node.get("properties"), dict) else ())
            for value in node.values():
                walk(value, seen, out)
        elif isinstance(node, list):
            for value in node:
                walk(value, seen, out)
        return out

    return {(method.upper(), path): walk(op.get("requestBody", {}), set(), set())
            for path, ops in spec["paths"].items() for method, op in ops.items()}


FIELDS = schema_fields(LATE.target.openapi())


def names_in(case) -> set[str]:
    """Every name and value a refusal could be about: body keys (nested too), the body schema's fields,
    query and path parameters."""
    names: set[str] = {"body"}  # a body that is not JSON, or not an object, is refused as "the body"
    names |= FIELDS.get((case.method.upper(), case.path), set())

    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                names.add(str(k))
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(case.body)
    for params in (case.query, case.path_parameters):
        for k, v in (params or {}).items():
            names.update({str(k), str(v)})
    return names


def refusal_names_a_field(response, case) -> bool:
    """The refusal's JSON says which input it refuses: a field in `loc` or `param`, or in the message."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    detail = body.get("detail", body.get("error"))
    if isinstance(detail, dict):  # OpenAI's shape: {"error": {"message", "param", ...}}
        text = f"{detail.get('param')} {detail.get('message')}"
    elif isinstance(detail, list):  # pydantic's and t2i's: [{"loc": [...], "msg": ...}]
        text = " ".join(f"{' '.join(map(str, d.get('loc', [])))} {d.get('msg', '')}" for d in detail
                        if isinstance(d, dict))
    else:
        text = str(detail)
    return any(name and name in text for name in names_in(case))


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_no_traceback_every_refusal_names_its_field(case):
    response = case.call()
    SEEN[response.status_code] += 1
    where = f"{case.method} {case.formatted_path} {str(case.body)[:300]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    assert not TRACEBACK.search(response.text), f"{where} -> a traceback in the body: {response.text[:500]}"
    if response.status_code == 405:  # a method the route lacks (the fuzzer tries them): Allow names the right ones
        assert response.headers.get("allow"), f"{where} -> 405 without Allow"
    elif 400 <= response.status_code < 500:
        assert refusal_names_a_field(response, case), \
            f"{where} -> {response.status_code} names no field: {response.text[:500]}"
