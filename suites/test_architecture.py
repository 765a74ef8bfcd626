"""The folder tree is the data flow: the engine (`parity/` top level) knows no model family and no transformers;
the model family (`granite_speech/`) knows nothing of the harness; the glues (`parity/granite/`, `parity/granite_lm.py`,
`parity/fms_arch/` for every FMS architecture) are the only places they meet; no import cycles. Checked on the source (every import statement, lazy ones included)."""

import ast
from pathlib import Path

import pytest

from granite_speech.config import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # source and configs only
PACKAGES = ("granite_speech", "parity")
GLUE = ("parity.granite", "parity.granite_lm", "parity.fms_arch")
ENGINE_FORBIDDEN = ("transformers", "granite_speech", "fms", "peft") + GLUE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from a import b` imports module a.b when b is a module
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = targets
    return graph


GRAPH = _import_graph()


def _is(target: str, prefixes) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_the_engine_imports_no_model_family_and_no_transformers():
    engine = [m for m in GRAPH if m.startswith("parity") and not _is(m, GLUE)]
    assert {"parity.capture", "parity.diff", "parity.probes", "parity.report", "parity.testing"} <= set(engine)
    offenders = {m: sorted(t for t in GRAPH[m] if _is(t, ENGINE_FORBIDDEN)) for m in engine}
    assert not {m: t for m, t in offenders.items() if t}, offenders


def test_the_model_family_never_imports_the_harness():
    offenders = {m: sorted(t for t in targets if _is(t, ("parity",)))
                 for m, targets in GRAPH.items() if m.startswith("granite_speech")}
    assert not {m: t for m, t in offenders.items() if t}, offenders


def test_no_import_cycles():
    project = {m: {t for t in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(project[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(project):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_equals_its_fixture_config(variant):
    """Variants are defined once (granite_speech.config.VARIANTS); the fixture's HF config.json of the same name must
    build exactly that FMS config (with the adapter the fixture builder writes)."""
    from granite_speech.config import from_hf_config
    from parity.granite.fixtures import load_hf_config
    from parity.granite.fixtures.checkpoint import default_lora_shape

    hf_config = load_hf_config(variant)
    rank, alpha = default_lora_shape(hf_config)
    built = from_hf_config(hf_config, {"lora_rank": rank, "lora_alpha": float(alpha)})
    expected = VARIANTS[variant]
    for part in ("encoder_config", "projector_config", "text_config"):
        assert getattr(built, part).as_dict() == getattr(expected, part).as_dict(), f"{variant}: {part} differs"
    assert (built.audio_token_index, built.lora_rank, built.lora_alpha) == (
        expected.audio_token_index, expected.lora_rank, expected.lora_alpha)
