"""What a flow run did, slide by slide and stage by stage, as data, markdown and a failure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("ingest", "scribbles", "bootstrap", "weights", "train", "infer")
#: "cached": Prefect's task cache answered (inputs unchanged); "skipped": the stage's own
#: check found its output current; "written": the stage did the work.
DONE = ("written", "skipped", "cached")


@dataclass(frozen=True)
class StageOutcome:
    """One task's result: a slide (or the training run) through one stage."""

    stage: str
    slide: str
    status: str
    seconds: float = 0.0
    store: Path | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status not in DONE


@dataclass(frozen=True)
class TrainedModel:
    """The model version a training run registered."""

    name: str
    version: str
    run_id: str
    champion: bool
    metrics: dict[str, float] = field(default_factory=dict)
    experiment_id: str = ""
    #: Registry aliases moved to this version (`candidate`, and `champion` when it won).
    aliases: tuple[str, ...] = ()


@dataclass
class RunSummary:
    """Every outcome of one flow run, the model it trained and the one it segmented with."""

    flow: str
    outcomes: list[StageOutcome] = field(default_factory=list)
    trained: TrainedModel | None = None
    segmented_with: str | None = None
    #: Warnings that fail nothing, e.g. a label file that pairs with no slide (left out).
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[StageOutcome]:
        return [outcome for outcome in self.outcomes if outcome.failed]

    def of(self, stage: str) -> list[StageOutcome]:
        return [outcome for outcome in self.outcomes if outcome.stage == stage]

    def stores(self, stage: str) -> list[Path]:
        """Stores that came through `stage`."""
        return [o.store for o in self.of(stage) if not o.failed and o.store is not None]

    def headline(self) -> str:
        """One line: how many slides went through, how many failed; a run that only trained
        says what it registered instead."""
        slides = {o.slide for o in self.outcomes if o.stage != "train"}
        failed = {o.slide for o in self.failures}
        if not slides and self.trained is not None:
            return f"{self.flow}: trained {self.trained.name} version {self.trained.version}"
        if not slides and failed:
            return f"{self.flow}: training failed"
        text = f"{self.flow}: {len(slides)} slide(s), {len(failed)} failed"
        if failed:
            text += " (" + ", ".join(sorted(failed)) + ")"
        return text

    def markdown(self) -> str:
        """The flow run's Prefect artifact: the model line, then one row per slide."""
        lines = [f"# segflow {self.flow}", "", self.headline(), ""]
        if self.notes:
            lines += [*(f"- note: {_escape(note)}" for note in self.notes), ""]
        if self.trained is not None:
            lines += [_trained_line(self.trained), ""]
        if self.segmented_with is not None:
            lines += [f"segmented with `{self.segmented_with}`", ""]
        stages = [s for s in STAGES if s != "train" and self.of(s)]
        lines.append("| slide | " + " | ".join(stages) + " | seconds | notes |")
        lines.append("|---" * (len(stages) + 3) + "|")
        for slide, row in _rows(self.outcomes, stages).items():
            cells = [_cell(row.get(stage)) for stage in stages]
            seconds = sum(o.seconds for o in row.values())
            notes = "; ".join(f"{o.stage}: {o.detail}" for o in row.values() if o.detail)
            row_cells = [_escape(slide), *cells, f"{seconds:.1f}", _escape(notes)]
            lines.append("| " + " | ".join(row_cells) + " |")
        for outcome in self.of("train"):
            lines += [
                "",
                f"train: **{outcome.status}** in {outcome.seconds:.1f} s {outcome.detail}",
            ]
        return "\n".join(lines) + "\n"


class SlideFailures(Exception):
    """Some slides failed; the others completed. Carries the run's summary."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(summary.headline())
        self.summary = summary

    def __reduce__(self):
        return (SlideFailures, (self.summary,))


def _trained_line(model: TrainedModel) -> str:
    verdict = "became champion" if model.champion else "did not beat the champion"
    text = f"trained `{model.name}` version **{model.version}** (MLflow run `{model.run_id}`)"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(model.metrics.items()))
    return f"{text}: {verdict}" + (f"; {metrics}" if metrics else "")


def _escape(text: str) -> str:
    """Table-safe text: a pipe in an error message must not split the row."""
    return text.replace("|", "\\|")


def _rows(outcomes: list[StageOutcome], stages: list[str]) -> dict[str, dict[str, StageOutcome]]:
    rows: dict[str, dict[str, StageOutcome]] = {}
    for outcome in outcomes:
        if outcome.stage in stages:
            rows.setdefault(outcome.slide, {})[outcome.stage] = outcome
    return rows


def _cell(outcome: StageOutcome | None) -> str:
    if outcome is None:
        return "–"
    return f"**{outcome.status.upper()}**" if outcome.failed else outcome.status
