"""`t2i samplers`: the sampler names and their A1111 names."""

from __future__ import annotations

from t2i.samplers import DEFAULT_SAMPLER, SAMPLERS


def add_parser(sub) -> None:
    s = sub.add_parser("samplers", help="list sampler names and their A1111 names")
    s.set_defaults(func=cmd_samplers)



def cmd_samplers(args) -> int:
    width = max(len(n) for n in SAMPLERS)
    print(f"{'name':<{width}}  A1111 name")
    for name, s in SAMPLERS.items():
        mark = "  (default)" if name == DEFAULT_SAMPLER else ""
        print(f"{name:<{width}}  {s.a1111}{mark}")
    return 0
