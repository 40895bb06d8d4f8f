"""Where an LLM judge's weights come from: a local directory or a hub id, checked before any load.

Each refusal is one line that says what to supply: weights missing offline (which path),
pickle-only weights (the conversion command: the suite never unpickles), a model that runs its
own code without the user's --trust-remote-code.
"""

from __future__ import annotations

from pathlib import Path

from bench import models
from bench.errors import UserError

# where the user supplies weights, by default (a setting says judge.pretrained instead)
SUPPLY = "--pretrained {}"
CONVERT = (
    'python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('{src}').save_pretrained('{src}-safetensors', safe_serialization=True)\""
)


def check_remote_code(judge: str, needs_remote_code: bool, trust_remote_code: bool) -> None:
    if needs_remote_code and not trust_remote_code:
        raise UserError(
            f"judge {judge!r} runs code shipped with its weights: pass --trust-remote-code "
            "(judge: {trust_remote_code: true} in a setting) if you trust that code"
        )


def resolve_weights(judge: str, pretrained: str | None, default: str, supply: str = SUPPLY) -> models.ModelHandle:
    """The judge's weights as a ModelHandle: `pretrained` (a directory or hub id), else `default`.
    `supply` says where the user gives a folder ("--pretrained {}"), for the error lines."""
    if not (pretrained or default):
        raise UserError(
            f"judge {judge!r} has no default weights: pass {supply.format('DIR')} (a local chat model directory)"
        )
    where = str(pretrained or default)
    path = Path(where).expanduser()
    if path.is_dir():
        _refuse_pickle_only(judge, path, supply)
        return models.resolve(path)
    if pretrained is not None and ("/" not in where or where.startswith((".", "/", "~"))):
        raise UserError(
            f"judge {judge!r}: weights directory {where!r} does not exist; pass {supply.format('DIR')} with the "
            "judge's weights"
        )
    try:
        from huggingface_hub import snapshot_download

        local = Path(
            snapshot_download(
                where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin", "*.py"]
            )
        )
    except Exception as exc:  # offline, gated or missing: the same fix for the user
        raise UserError(
            f"judge {judge!r}: weights {where!r} are not on this machine and could not be fetched "
            f"({type(exc).__name__}); download {where} where the hub is reachable and pass "
            f"{supply.format('DIR')} (the downloaded folder)"
        ) from None
    _refuse_pickle_only(judge, local, supply)
    return models.resolve(local)


def _refuse_pickle_only(judge: str, path: Path, supply: str) -> None:
    if not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
        raise UserError(
            f"judge {judge!r}: {path} holds only pickled .bin weights, which the suite does not load; convert "
            f"them once where you trust the files: {CONVERT.format(src=path)}, then pass "
            f"{supply.format(f'{path}-safetensors')}"
        )
