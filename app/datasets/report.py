"""What validation found: problems counted by kind with their first line numbers, and file statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_EXAMPLES = 10
LINES_SHOWN_PER_KIND = 5


@dataclass
class ProblemKind:
    count: int = 0
    lines: list[int] = field(default_factory=list)  # the first few, in file order


@dataclass
class ValidationReport:
    format: str | None = None  # "chat" | "prompt_completion" | "preference"
    n_examples: int = 0
    n_lines: int = 0
    problems: dict[str, ProblemKind] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def add(self, kind: str, line: int | None) -> None:
        problem = self.problems.setdefault(kind, ProblemKind())
        problem.count += 1
        if line is not None and len(problem.lines) < LINES_SHOWN_PER_KIND:
            problem.lines.append(line)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def code(self) -> str | None:
        """The error code a client sees: OpenAI's own code when too few examples is the only problem."""
        if self.ok:
            return None
        if set(self.problems) == {"too_few_examples"}:
            return "invalid_n_examples"
        return "invalid_file"

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.n_examples} {self.format} examples"
        total = sum(p.count for p in self.problems.values())
        parts = []
        for kind, problem in self.problems.items():
            if kind == "too_few_examples":
                parts.append(
                    f"too_few_examples: file has {self.n_examples} example(s), "
                    f"but must have at least {MIN_EXAMPLES} examples"
                )
                continue
            where = ""
            if problem.lines:
                more = ", ..." if problem.count > len(problem.lines) else ""
                label = "line" if len(problem.lines) == 1 and not more else "lines"
                where = f" ({label} {', '.join(map(str, problem.lines))}{more})"
            parts.append(f"{kind}: {problem.count}{where}")
        return f"Invalid file: {total} problem(s). " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "n_examples": self.n_examples,
            "problems": {k: {"count": p.count, "lines": p.lines} for k, p in self.problems.items()},
            "stats": self.stats,
        }
