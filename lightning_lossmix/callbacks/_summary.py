"""The end-of-fit summary `GradientMonitor` prints: the last measurement, as a small table."""

from __future__ import annotations

from collections.abc import Mapping


def summary_table(metrics: Mapping[str, float], step: int, log_dir: str | None) -> str:
    """Format the shares per group, the conflicts and the suggested weights of a measurement.

    Examples:
        >>> print(summary_table({"grad_share/all/fit": 0.9, "grad_share/all/kl": 0.1,
        ...     "grad_cosine/all/fit_vs_kl": -0.25, "grad_suggested_weight/fit": 0.56,
        ...     "grad_suggested_weight/kl": 5.0}, 99, "runs/vae/version_0"))
        GradientMonitor: last measurement, step 99
          share of each group's pull
            group  fit    kl
            all    0.900  0.100
          conflicts (negative cosines): all: fit vs kl -0.250
          suggested weights: fit 0.56, kl 5
        Draw the report: lightning-lossmix report runs/vae/version_0
    """
    shares: dict[str, dict[str, float]] = {}
    terms: list[str] = []
    for tag, value in metrics.items():
        kind, _, rest = tag.partition("/")
        if kind == "grad_share":
            group, _, term = rest.rpartition("/")
            shares.setdefault(group, {})[term] = value
            terms += [term] if term not in terms else []
    for group, row in shares.items():  # players: each player's shares sum to 1
        start = f"grad_magnitude/{group}/"
        pulls = {t[len(start) :]: v for t, v in metrics.items() if t.startswith(start)}
        total = sum(pulls.values())
        several = set(pulls) - set(row) or sum(row.values()) > 1 + 1e-6  # one term: no shares
        if several and total > 0:
            shares[group] = {t: pull / total for t, pull in pulls.items()}
            terms += [t for t in pulls if t not in terms]
    lines = [f"GradientMonitor: last measurement, step {step}"]
    if shares:
        width = max(len("group"), *map(len, shares))
        widths = [max(5, len(t)) for t in terms]
        lines.append("  share of each group's pull")
        header = "  ".join(t.ljust(w) for t, w in zip(terms, widths, strict=True))
        lines.append(f"    {'group'.ljust(width)}  {header}".rstrip())
        for group, row in shares.items():
            cells = [
                (f"{row[t]:.3f}" if t in row else "-").ljust(w)
                for t, w in zip(terms, widths, strict=True)
            ]
            lines.append(f"    {group.ljust(width)}  {'  '.join(cells)}".rstrip())
    conflicts = [
        f"{tag.split('/')[1]}: {tag.split('/')[-1].replace('_vs_', ' vs ')} {value:.3f}"
        for tag, value in metrics.items()
        if tag.startswith("grad_cosine/") and value < 0
    ]
    lines.append(f"  conflicts (negative cosines): {'; '.join(conflicts) or 'none'}")
    suggested = [
        f"{tag.split('/', 1)[1]} {value:.3g}"
        for tag, value in metrics.items()
        if tag.startswith("grad_suggested_weight/")
    ]
    if suggested:
        lines.append(f"  suggested weights: {', '.join(suggested)}")
    if log_dir is not None:
        lines.append(f"Draw the report: lightning-lossmix report {log_dir}")
    return "\n".join(lines)
