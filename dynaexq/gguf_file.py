"""A llama.cpp GGUF file as a budget: `--weight-budget FILE.gguf` is the bytes of its tensors, `--read-budget
FILE.gguf` what one decode token reads of them. A GGUF weight budget brings its file's reads as the read budget
unless `--read-budget` says otherwise (a size, another file, or `none`): naming a file asks for a replacement of
it, as large and as fast to decode (`budgets`).

Read with the `gguf` package (llama.cpp's own reader), from the header only. What a token reads: every tensor but
the input embedding when the file has a separate output head (a token reads one row of it), and of each expert
tensor (`*_exps`) its routed share, the file's `<arch>.expert_used_count / <arch>.expert_count`.
Anything else given is a size (`sizes.parse_size`).
"""
from __future__ import annotations

from pathlib import Path

from dynaexq.errors import UserError
from dynaexq.sizes import parse_size


def _tensors_and_meta(path) -> tuple[list, dict]:
    import gguf

    if not Path(path).is_file():
        raise UserError(f"no GGUF file {str(path)!r}; give an existing file or a size such as 17GiB")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader's own errors name no common type
        raise UserError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    meta = {key: field.contents() for key, field in reader.fields.items() if "expert" in key or key.startswith(
        "general.architecture")}
    return [(t.name, int(t.n_bytes)) for t in reader.tensors], meta


def file_bytes(path) -> int:
    """Bytes of every tensor of the file (what its weights weigh)."""
    return sum(n for _, n in _tensors_and_meta(path)[0])


def step_bytes(path) -> int:
    """Bytes one decode token reads of the file: every tensor but an untied input embedding, the experts' tensors
    at their routed share."""
    tensors, meta = _tensors_and_meta(path)
    names = {name for name, _ in tensors}
    arch = meta.get("general.architecture")
    used, count = meta.get(f"{arch}.expert_used_count"), meta.get(f"{arch}.expert_count")
    total = 0
    for name, n in tensors:
        if name == "token_embd.weight" and "output.weight" in names:
            continue
        if "_exps" in name:
            if not used or not count:
                raise UserError(f"{str(path)!r} has expert tensors but no {arch}.expert_used_count / "
                                f"{arch}.expert_count: give --read-budget as a size")
            n = n * used // count
        total += n
    return total


def _is_gguf(value) -> bool:
    return isinstance(value, (str, Path)) and str(value).lower().endswith(".gguf")


def weight_budget(value) -> int:
    """--weight-budget: a size, or a GGUF file (its tensors' bytes)."""
    return file_bytes(value) if _is_gguf(value) else parse_size(value)


def read_budget(value) -> int | None:
    """--read-budget: a size, a GGUF file (what a decode token reads of it), or "none" (no cap)."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return step_bytes(value) if _is_gguf(value) else parse_size(value)


def budgets(weight, read) -> tuple[int | None, int | None]:
    """(--weight-budget, --read-budget) -> their bytes; a GGUF weight budget with no --read-budget caps the reads
    at its file's."""
    wb = None if weight is None else weight_budget(weight)
    if read is None:
        return wb, (step_bytes(weight) if _is_gguf(weight) else None)
    return wb, read_budget(read)
