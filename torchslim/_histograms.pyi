from typing import Any

def float32_histogram_protos(
    arrays: list[Any], cells: Any, thresholds: Any, limits: Any, /
) -> list[bytes] | int: ...

def gather_float32(destination: int, capacity: int, sources: list[tuple[int, int]], /) -> int: ...
