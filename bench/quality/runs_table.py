"""ACC and BWT of every variant from the committed per-order results alone, without the fine-tune cache.

The full report (`--report-only`) needs every fine-tune on disk for its references (θ0 + heads,
individual accuracies); this table needs only `bench/results/runs/<key>/`, so anyone can check a
published figure from a fresh clone in seconds. `--orders` restricts every variant to the same
orders, the only fair way to compare variants that ran a different number of them.

    python -m bench.quality.runs_table bench/results/runs/a1825bae89fd --orders 0-3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .metrics import acc, bwt, mean_std, round_accs


def parse_orders(text: str | None) -> set[int] | None:
    """'0-3' or '0,2,5' → the order indices; None → every order on disk."""
    if not text:
        return None
    orders: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        orders.update(range(int(lo), int(hi or lo) + 1))
    return orders


def load_variant(folder: Path, orders: set[int] | None) -> list[dict]:
    records = [json.loads(p.read_text()) for p in folder.glob("order-*.json")]
    records.sort(key=lambda r: r["order_index"])
    return [r for r in records if orders is None or r["order_index"] in orders]


def rows(runs: Path, orders: set[int] | None) -> list[dict]:
    table = []
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        records = load_variant(folder, orders)
        if not records:
            continue
        accs = [acc(r) for r in records]
        mean, std = mean_std(accs)
        rounds = [round_accs(r) for r in records]
        table.append({
            "variant": folder.name.rsplit("-", 1)[0],  # the folder names the variant's current settings
            "orders": [r["order_index"] for r in records],
            "acc": mean, "std": std,
            "bwt": mean_std([bwt(r) for r in records])[0],
            "per_order": accs,
            # ACC at the end of each round, averaged over the orders (one value unless a long stream)
            "rounds": [mean_std([r[i] for r in rounds])[0] for i in range(min(len(r) for r in rounds))],
        })
    return sorted(table, key=lambda row: -row["acc"])


def markdown(table: list[dict]) -> str:
    long_stream = any(len(row["rounds"]) > 1 for row in table)
    head = ["variant", "orders", "ACC", "BWT", "ACC per order"] + (["ACC after each round"] if long_stream else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["variant"], ",".join(map(str, row["orders"])), f"{row['acc']:.2f} ± {row['std']:.2f}",
                 f"{row['bwt']:.2f}", ", ".join(f"{a:.2f}" for a in row["per_order"])]
        if long_stream:
            cells.append(" → ".join(f"{a:.2f}" for a in row["rounds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.runs_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="a folder bench/results/runs/<key>/ (one preset and task set)")
    parser.add_argument("--orders", help="only these orders, e.g. 0-2 or 0,1,4 (default: all on disk)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a folder of per-order results", file=sys.stderr)
        return 1
    table = rows(args.runs, parse_orders(args.orders))
    if not table:
        print(f"error: no order-*.json under {args.runs} for these orders", file=sys.stderr)
        return 1
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
