"""`t2i samplers`: the sampler names, their A1111 names, and the schedules beside them."""

from __future__ import annotations

from t2i.samplers import COMBINED, DEFAULT_SAMPLER, SAMPLERS, SCHEDULES, UNSUPPORTED_SCHEDULES


def add_parser(sub) -> None:
    s = sub.add_parser("samplers", help="list samplers and schedules (t2i and A1111 names)")
    s.set_defaults(func=cmd_samplers)



def cmd_samplers(args) -> int:
    width = max(len(n) for n in SAMPLERS)
    a_width = max(len(s.a1111) for s in SAMPLERS.values())
    print(f"{'sampler':<{width}}  {'A1111 name':<{a_width}}  automatic schedule; schedules")
    for name, s in SAMPLERS.items():
        mark = "  (default)" if name == DEFAULT_SAMPLER else ""
        if s.automatic == "automatic":
            schedules = "its own steps (A1111 gives it no schedule type)"
        else:
            offered = [k for k in s.schedules if SCHEDULES[k].a1111]
            schedules = f"{s.automatic}; {', '.join(offered)}"
        print(f"{name:<{width}}  {s.a1111:<{a_width}}  {schedules}{mark}")
    print()
    print("schedule     A1111 Schedule type")
    for key, sch in SCHEDULES.items():
        if sch.a1111:
            print(f"{key:<12} {sch.label}")
    print(f"\nnot run (no exact diffusers equivalent): {', '.join(UNSUPPORTED_SCHEDULES)}")
    print("old combined names still work: " + ", ".join(COMBINED) + ' (and A1111\'s, e.g. "DPM++ 2M Karras")')
    return 0
