"""Checklists as data: dimension > sub-dimension > ordered options > binary questions.

A checklist file (YAML, in ``reward/checklists/`` or anywhere) declares:

- ``scoring``: how answers become features (``answers``: soft 2p(yes)-1 | binary 0/1 | signed ±1;
  ``gates``: soft | hard; ``reduction``: sum | mean) — the release's rules are two settings of these;
- ``dimensions``: either nested (each sub-dimension lists its questions) or flat (a top-level
  ``questions`` list in which every question names its ``sub_dimension``, for lists whose order matters,
  like the released ones whose weights are positional);
- per question: ``id``, ``text`` (``[[prompt]]`` is replaced by the prompt), the ``option`` it tests,
  ``presence: true`` for questions that are asked but only gate others, ``gate: <id>`` for questions
  that count only when that presence question says yes, or ``ref: <id>`` to score an already-listed
  question a second time in another sub-dimension (the paper's image table uses "Is there lighting and
  shadow?" for two sub-dimensions; it is asked once), and ``aliases``: other wordings of the same
  question (the release's lists word a few questions differently from the paper), accepted wherever a
  question is named by its text (answers files) but never asked;
- an optional ``alignment`` term (image-text match probability, asked by the backend as its own query);
- ``weights`` (``values`` in feature order, or a mapping feature -> weight, and ``intercept``), or
  ``default_weight: equal`` for checklists without published weights.

*Questions* are what a backend is asked (distinct texts); *features* are what is weighted: every
non-presence entry (refs included) plus the alignment term, in file order with alignment first.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from reward.errors import RewardInputError

CHECKLIST_DIR = Path(__file__).parent / "checklists"
ANSWER_MODES = ("soft", "binary", "signed")
GATE_MODES = ("soft", "hard")
REDUCTIONS = ("sum", "mean")
PROMPT_SLOT = "[[prompt]]"
ALIGNMENT = "alignment"

_QUESTION_KEYS = {"id", "text", "option", "presence", "gate", "ref", "sub_dimension", "dimension", "aliases"}
_TOP_KEYS = {
    "name",
    "modality",
    "description",
    "scoring",
    "alignment",
    "dimensions",
    "questions",
    "weights",
    "default_weight",
}


class ChecklistError(RewardInputError):
    """A checklist or weights file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class ScoringRule:
    answers: str = "soft"
    gates: str = "soft"
    reduction: str = "sum"


@dataclass(frozen=True)
class Question:
    """A distinct question the backend is asked."""

    id: str
    text: str
    sub_dimension: str
    dimension: str
    option: str | None = None
    presence: bool = False
    gate: str | None = None
    aliases: tuple[str, ...] = ()

    def render(self, prompt: str) -> str:
        return self.text.replace(PROMPT_SLOT, prompt)

    def names(self, prompt: str = "") -> list[str]:
        """Every key that names this question: id, text, aliases (as written and with the prompt)."""
        texts = [self.text, *self.aliases]
        return [self.id, *texts, *(t.replace(PROMPT_SLOT, prompt) for t in texts)]


@dataclass(frozen=True)
class Feature:
    """A weighted entry: one question's (gated) answer in one sub-dimension, or the alignment term."""

    name: str
    question: int  # index into Checklist.questions; -1 for the alignment term
    sub_dimension: str
    dimension: str
    gate: int = -1  # index of the gating presence question, -1 if ungated


@dataclass
class Checklist:
    name: str
    modality: str
    scoring: ScoringRule
    questions: list[Question]
    features: list[Feature]
    dimensions: list[str]
    sub_dimensions: list[str]
    sub_to_dimension: dict[str, str]
    weights: np.ndarray
    intercept: float = 0.0
    alignment_question: str | None = None
    source: str = ""
    weights_source: str = ""
    options: dict[str, list[str]] = field(default_factory=dict)

    # ---- lookups ---------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def question_ids(self) -> list[str]:
        return [q.id for q in self.questions]

    def question_texts(self, prompt: str = "") -> list[str]:
        return [q.render(prompt) for q in self.questions]

    def alignment_text(self, prompt: str) -> str | None:
        return (
            None if self.alignment_question is None else self.alignment_question.replace(PROMPT_SLOT, prompt)
        )

    def question_index(self, key: int | str) -> int:
        """A question by position, id, or text (as in the file, or with a prompt filled in)."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            idx = int(key)
            if not 0 <= idx < len(self.questions):
                raise KeyError(f"question index {idx} out of range 0..{len(self.questions) - 1}")
            return idx
        lookup = self._lookup()
        if key in lookup:
            return lookup[key]
        raise KeyError(f"unknown question {key!r}")

    def _lookup(self) -> dict[str, int]:
        table: dict[str, int] = {}
        for i, q in enumerate(self.questions):
            for name in q.names():
                table[name] = i
        return table

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.dimensions)} dimensions, {len(self.sub_dimensions)} sub-dimensions, "
            f"{len(self.questions)} questions, {len(self.features)} weighted features"
            + (" (incl. alignment)" if self.alignment_question else "")
        )

    # ---- weights ---------------------------------------------------------------------------------
    def with_weights(self, path: str | Path) -> Checklist:
        """A copy whose weights come from a weights file (e.g. written by ``reward fit``)."""
        path = Path(path)
        try:
            data = (
                json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
            )
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise ChecklistError(f"{path}: cannot read weights file ({err})") from err
        if not isinstance(data, dict):
            raise ChecklistError(f"{path}: a weights file is a mapping with 'weights' (and 'intercept')")
        if data.get("checklist") not in (None, self.name):
            raise ChecklistError(
                f"{path}: weights were fitted for checklist {data['checklist']!r}, not {self.name!r}"
            )
        if "features" in data and list(data["features"]) != self.feature_names:
            raise ChecklistError(
                f"{path}: 'features' do not match checklist {self.name!r} (expected {self.feature_names})"
            )
        weights, intercept = parse_weights(data, self.feature_names, str(path))
        return replace(self, weights=weights, intercept=intercept, weights_source=str(path))

    def weights_dict(self, method: str = "") -> dict[str, Any]:
        """The weights file format :meth:`with_weights` reads."""
        return {
            "checklist": self.name,
            "features": self.feature_names,
            "weights": [float(w) for w in self.weights],
            "intercept": float(self.intercept),
            **({"method": method} if method else {}),
        }


def parse_weights(data: dict, feature_names: list[str], where: str) -> tuple[np.ndarray, float]:
    raw = data.get("weights", data.get("values"))
    if raw is None:
        raise ChecklistError(f"{where}: weights: missing 'values' (one per feature: {len(feature_names)})")
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(feature_names))
        missing = [n for n in feature_names if n not in raw]
        if unknown or missing:
            raise ChecklistError(
                f"{where}: weights: {len(raw)} given for {len(feature_names)} features"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
            )
        values = [raw[n] for n in feature_names]
    else:
        values = list(raw)
        if len(values) != len(feature_names):
            raise ChecklistError(
                f"{where}: weights: {len(values)} values for {len(feature_names)} features "
                f"({', '.join(feature_names[:4])}, ...)"
            )
    try:
        weights = np.asarray(values, dtype=np.float64)
        intercept = float(
            data.get("intercept", 0.0)
            if not isinstance(data.get("intercept"), list)
            else data["intercept"][0]
        )
    except (TypeError, ValueError) as err:
        raise ChecklistError(f"{where}: weights: not numbers ({err})") from err
    if not np.all(np.isfinite(weights)):
        raise ChecklistError(f"{where}: weights: non-finite values")
    return weights, intercept


# ---- loading ----------------------------------------------------------------------------------------
def available_checklists() -> list[str]:
    return sorted(p.stem for p in CHECKLIST_DIR.glob("*.yaml"))


def load_checklist(name_or_path: str | Path, weights: str | Path | None = None) -> Checklist:
    """A bundled checklist by name (``image-full``, ``image-official``, ``video-full``,
    ``video-official``) or a YAML path; ``weights`` replaces its weights with a weights file (a path, or
    the name of a bundled one, see :func:`weights_path`)."""
    path = Path(name_or_path)
    if not path.suffix:
        bundled = CHECKLIST_DIR / f"{name_or_path}.yaml"
        if not bundled.exists():
            raise ChecklistError(
                f"unknown checklist {str(name_or_path)!r}; bundled: {available_checklists()} (or give a .yaml path)"
            )
        path = bundled
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ChecklistError(f"{path}: cannot read checklist ({err})") from err
    checklist = parse_checklist(data, str(path))
    return checklist.with_weights(weights_path(weights)) if weights else checklist


def weights_path(weights: str | Path) -> Path:
    """A weights file path, or the name of one bundled beside the checklists (``image-full.release-weights``)."""
    path = Path(weights)
    bundled = CHECKLIST_DIR / f"{path.name}.json"
    if not path.exists() and path.suffix != ".json" and bundled.exists():
        return bundled
    return path


def parse_checklist(data: Any, where: str) -> Checklist:
    if not isinstance(data, dict):
        raise ChecklistError(f"{where}: a checklist is a mapping")
    _reject_unknown(data, _TOP_KEYS, where)
    name = str(data.get("name") or Path(where).stem)
    modality = data.get("modality", "image")
    if modality not in ("image", "video"):
        raise ChecklistError(f"{where}: modality: {modality!r} is not one of ['image', 'video']")
    scoring = _parse_scoring(data.get("scoring") or {}, where)

    dims, sub_to_dim, options, entries = _parse_hierarchy(data, where)

    questions: list[Question] = []
    by_id: dict[str, int] = {}
    by_text: dict[str, str] = {}
    pending: list[tuple[dict, str, str]] = []  # (entry, sub, where) to build features after all ids known
    for entry, sub, entry_where in entries:
        _reject_unknown(entry, _QUESTION_KEYS, entry_where)
        if "ref" in entry:
            pending.append((entry, sub, entry_where))
            continue
        qid, text = entry.get("id"), entry.get("text")
        if not qid or not text:
            raise ChecklistError(f"{entry_where}: a question needs 'id' and 'text' (or 'ref')")
        if qid in by_id:
            raise ChecklistError(f"{entry_where}: duplicate question id {qid!r}")
        if text in by_text:
            raise ChecklistError(
                f"{entry_where}: duplicate question {text!r} (already asked as {by_text[text]!r}; use 'ref' to score it twice)"
            )
        aliases = entry.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ChecklistError(f"{entry_where}: aliases: expected a list of question texts")
        for alias in aliases:
            if alias in by_text:
                raise ChecklistError(
                    f"{entry_where}: alias {alias!r} already names question {by_text[alias]!r}"
                )
        if entry.get("dimension") not in (None, *sub_to_dim.values()):
            raise ChecklistError(
                f"{entry_where}: unknown dimension {entry['dimension']!r}; known: {sorted(set(sub_to_dim.values()))}"
            )
        if entry.get("dimension") not in (None, sub_to_dim[sub]):
            raise ChecklistError(
                f"{entry_where}: dimension {entry['dimension']!r} does not hold sub-dimension {sub!r} (it is in {sub_to_dim[sub]!r})"
            )
        by_id[qid] = len(questions)
        by_text[text] = qid
        by_text.update(dict.fromkeys(aliases, qid))
        questions.append(
            Question(
                id=str(qid),
                text=str(text),
                sub_dimension=sub,
                dimension=sub_to_dim[sub],
                option=entry.get("option"),
                presence=bool(entry.get("presence", False)),
                gate=entry.get("gate"),
                aliases=tuple(aliases),
            )
        )
        pending.append((entry, sub, entry_where))

    features: list[Feature] = []
    alignment = data.get("alignment")
    alignment_question = None
    if alignment is not None:
        if not isinstance(alignment, dict) or "question" not in alignment:
            raise ChecklistError(f"{where}: alignment: needs 'question' (and 'sub_dimension')")
        sub = alignment.get("sub_dimension", ALIGNMENT)
        if sub not in sub_to_dim:
            raise ChecklistError(
                f"{where}: alignment: unknown sub-dimension {sub!r}; known: {sorted(sub_to_dim)}"
            )
        alignment_question = str(alignment["question"])
        features.append(Feature(ALIGNMENT, -1, sub, sub_to_dim[sub]))

    for entry, sub, entry_where in pending:
        if "ref" in entry:
            ref = entry["ref"]
            if ref not in by_id:
                raise ChecklistError(
                    f"{entry_where}: ref {ref!r} points to no question; known ids: {_close(ref, by_id)}"
                )
            q = questions[by_id[ref]]
            fname = f"{ref}@{sub}"
            gate = q.gate
        else:
            q = questions[by_id[entry["id"]]]
            if q.presence:
                if q.gate:
                    raise ChecklistError(f"{entry_where}: presence question {q.id!r} cannot itself be gated")
                continue
            fname, gate = q.id, q.gate
        gate_idx = -1
        if gate is not None:
            if gate not in by_id:
                raise ChecklistError(
                    f"{entry_where}: gate {gate!r} points to no question; known ids: {_close(gate, by_id)}"
                )
            if not questions[by_id[gate]].presence:
                raise ChecklistError(
                    f"{entry_where}: gate {gate!r} is not a presence question (mark it 'presence: true')"
                )
            gate_idx = by_id[gate]
        features.append(Feature(fname, by_id[q.id], sub, sub_to_dim[sub], gate_idx))

    if not features:
        raise ChecklistError(f"{where}: no scored questions")
    sub_order = [s for d in dims for s in d[1]]
    used_subs = {f.sub_dimension for f in features}
    empty = [s for s in sub_order if s not in used_subs]
    if empty:
        raise ChecklistError(f"{where}: sub-dimension(s) {empty} have no scored question")
    feature_names = [f.name for f in features]

    if "weights" in data:
        weights, intercept = parse_weights(data["weights"] or {}, feature_names, f"{where}")
        weights_source = f"{where} (bundled)"
    elif data.get("default_weight", "equal") == "equal":
        weights, intercept = np.full(len(features), 1.0 / len(features)), 0.0
        weights_source = "equal weights (default: no published weights)"
    else:
        raise ChecklistError(f"{where}: default_weight: {data['default_weight']!r} is not 'equal'")

    return Checklist(
        name=name,
        modality=modality,
        scoring=scoring,
        questions=questions,
        features=features,
        dimensions=[d[0] for d in dims],
        sub_dimensions=sub_order,
        sub_to_dimension=sub_to_dim,
        weights=weights,
        intercept=intercept,
        alignment_question=alignment_question,
        source=where,
        weights_source=weights_source,
        options=options,
    )


def _parse_scoring(raw: Any, where: str) -> ScoringRule:
    if not isinstance(raw, dict):
        raise ChecklistError(f"{where}: scoring: expected a mapping")
    _reject_unknown(raw, {"answers", "gates", "reduction"}, f"{where}: scoring")
    rule = ScoringRule(**raw)
    for key, allowed in (("answers", ANSWER_MODES), ("gates", GATE_MODES), ("reduction", REDUCTIONS)):
        if getattr(rule, key) not in allowed:
            raise ChecklistError(
                f"{where}: scoring.{key}: {getattr(rule, key)!r} is not one of {list(allowed)}"
            )
    return rule


def _parse_hierarchy(data: dict, where: str):
    """-> (dims [(name, [subs])], sub -> dim, sub -> options, [(question entry, sub, where)])."""
    raw_dims = data.get("dimensions")
    if not isinstance(raw_dims, list) or not raw_dims:
        raise ChecklistError(f"{where}: dimensions: expected a non-empty list")
    dims: list[tuple[str, list[str]]] = []
    sub_to_dim: dict[str, str] = {}
    options: dict[str, list[str]] = {}
    entries: list[tuple[dict, str, str]] = []
    for i, raw in enumerate(raw_dims):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ChecklistError(f"{where}: dimensions[{i}]: needs a 'name'")
        dim = str(raw["name"])
        if any(d == dim for d, _ in dims):
            raise ChecklistError(f"{where}: dimensions[{i}]: duplicate dimension {dim!r}")
        subs: list[str] = []
        for j, sub_raw in enumerate(raw.get("sub_dimensions") or []):
            sub_where = f"{where}: {dim}.sub_dimensions[{j}]"
            sub = sub_raw if isinstance(sub_raw, str) else (sub_raw or {}).get("name")
            if not sub:
                raise ChecklistError(f"{sub_where}: needs a name")
            if sub in sub_to_dim:
                raise ChecklistError(
                    f"{sub_where}: duplicate sub-dimension {sub!r} (already in {sub_to_dim[sub]!r})"
                )
            sub_to_dim[sub] = dim
            subs.append(sub)
            if isinstance(sub_raw, dict):
                options[sub] = list(sub_raw.get("options") or [])
                for k, q in enumerate(sub_raw.get("questions") or []):
                    if not isinstance(q, dict):
                        raise ChecklistError(f"{sub_where}.questions[{k}]: expected a mapping")
                    if q.get("sub_dimension") not in (None, sub):
                        raise ChecklistError(
                            f"{sub_where}.questions[{k}]: sub_dimension {q['sub_dimension']!r} contradicts its place in {sub!r}"
                        )
                    entries.append((q, sub, f"{sub_where}.questions[{k}] ({q.get('id') or q.get('ref')})"))
        if not subs:
            raise ChecklistError(f"{where}: dimension {dim!r} has no sub-dimensions")
        dims.append((dim, subs))
    for k, q in enumerate(data.get("questions") or []):
        q_where = f"{where}: questions[{k}] ({q.get('id') if isinstance(q, dict) else q})"
        if not isinstance(q, dict):
            raise ChecklistError(f"{q_where}: expected a mapping")
        sub = q.get("sub_dimension")
        if sub not in sub_to_dim:
            hint = (
                f"unknown dimension {q['dimension']!r}"
                if q.get("dimension") and q["dimension"] not in {d for d, _ in dims}
                else f"unknown sub-dimension {sub!r}"
            )
            raise ChecklistError(f"{q_where}: {hint}; known sub-dimensions: {sorted(sub_to_dim)}")
        entries.append((q, sub, q_where))
    return dims, sub_to_dim, options, entries


def _reject_unknown(entry: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ChecklistError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _close(key: str, known: dict[str, int]) -> list[str]:
    return difflib.get_close_matches(str(key), list(known), n=3) or sorted(known)[:5]
