"""The JSON depth pre-scan grows linearly with its input (issue 19 finding 1).

Before: on an unterminated string of escaped quotes every quote started a new scan to the end of
the data, so the time grew with the square of the length (a 32 KiB publish body: 5.6 s, holding
the GIL). Measured here as a ratio, never as an absolute time: the scan of 4n bytes must take well
under 16 times (quadratic) the scan of n bytes. Each size is timed over enough repetitions to take
a measurable time, best of several runs, so the ratio is stable on a busy machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from soppu_registry.bodies import check_json_depth, loads_bounded
from soppu_registry.errors import ApiError

N = 4 << 10  # bytes at the small size; the quadratic scan took ~0.1 s here, ~1.5 s at 4n

SHAPES: dict[str, Callable[[int], bytes]] = {
    "escaped quotes, unterminated": lambda n: b'"' + b'\\"' * (n // 2),
    "escaped backslashes, unterminated": lambda n: b'"' + b"\\\\" * (n // 2),
    "quote-backslash pairs": lambda n: b'"\\' * (n // 2),
    "lone quotes": lambda n: b'"' * n,
    "many short strings": lambda n: b'["a",' + b'"a",' * (n // 4),
    "deep then shallow": lambda n: (b"[" * 30 + b'"]"' + b"]" * 30) * (n // 63),
    "backslashes": lambda n: b"\\" * n,
}


def _scan(data: bytes) -> None:
    try:
        check_json_depth(data, "body")
    except ApiError:
        pass


def _seconds(data: bytes, repeat: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeat):
            _scan(data)
        best = min(best, time.perf_counter() - t)
    return best


def _repeats_for(data: bytes, target: float = 0.02) -> int:
    """Repetitions that make one timing of ``data`` take about ``target`` seconds (at least 1)."""
    t = time.perf_counter()
    _scan(data)
    once = max(time.perf_counter() - t, 1e-7)
    return max(1, int(target / once))


@pytest.mark.parametrize("shape", SHAPES)
def test_scan_time_grows_linearly(shape: str) -> None:
    small, large = SHAPES[shape](N), SHAPES[shape](4 * N)
    assert 3.9 < len(large) / len(small) < 4.1
    repeat = _repeats_for(small)
    ratio = _seconds(large, repeat) / _seconds(small, repeat)
    assert ratio < 8, f"{shape}: 4x the bytes took {ratio:.1f}x the time (linear: ~4, quadratic: ~16)"


def test_the_scan_still_finds_depth_outside_strings_only() -> None:
    check_json_depth(b"[" * 32 + b"]" * 32, "body")
    check_json_depth(b'"' + b"[" * 100 + b'"', "body")  # brackets inside a string do not count
    check_json_depth(b'"\\"' + b"[" * 100 + b'"', "body")  # nor after an escaped quote
    check_json_depth(b'"' + b"\\" * 4 + b"[" * 100, "body")  # an unterminated string runs to the end
    with pytest.raises(ApiError, match="body nests JSON deeper than 32 levels"):
        check_json_depth(b"[" * 33, "body")
    with pytest.raises(ApiError, match="deeper than 32"):
        check_json_depth(b'"\\\\"' + b"[" * 33, "body")  # the string ended: the brackets count
    with pytest.raises(ApiError, match="deeper than 32"):
        check_json_depth(b'{"a":"x"}' * 100 + b"[" * 33, "body")


def test_loads_bounded_refuses_duplicate_keys_and_non_json() -> None:
    assert loads_bounded(b'{"a": [1, {"b": "]\\""}]}', "body") == {"a": [1, {"b": ']"'}]}
    with pytest.raises(ApiError, match="body is ambiguous JSON: key 'a' appears twice in one object"):
        loads_bounded(b'{"a": 1, "b": {"a": 2, "a": 3}}', "body")
    with pytest.raises(ApiError, match="body is not JSON"):
        loads_bounded(b'"\\"\\"', "body")
