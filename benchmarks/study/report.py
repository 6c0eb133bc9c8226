"""Tables of the method study and the decision of its pre-stated rule (docs/ablations.md):

    python -m benchmarks.study.report runs/study/results.jsonl [--markdown OUT.md]

Per family: every variant's eval-level cluster mIoU (mean ± std over seeds) and its paired
difference from the default (mean ± std of the per-seed differences); per-level scores and the
hierarchy's consistency; then the rule applied mechanically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RULE_FAMILIES = ("flat", "tree")
REFERENCES = ("no hierarchy (λ_hier 0)", "STEGO baseline", "STEGO code + k-means", "k-means (raw)",
              "OMH on SmooSeg", "SmooSeg baseline", "SmooSeg code + k-means",
              "OMH on HP", "HP baseline", "HP code + k-means")
DEFAULT = "default"
# The bases side by side: each base alone (its own probe, and k-means on its code) and OMH on it.
BASES = {"STEGO": ("STEGO baseline", "STEGO code + k-means", DEFAULT),
         "SmooSeg": ("SmooSeg baseline", "SmooSeg code + k-means", "OMH on SmooSeg"),
         "HP": ("HP baseline", "HP code + k-means", "OMH on HP")}


def load(path):
    recs = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    bad = [r for r in recs if "error" in r]
    return [r for r in recs if "error" not in r], bad


def _ms(v):
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def by_variant(recs, family, key="miou"):
    """{variant: {seed: value}} of one family."""
    out = {}
    for r in recs:
        if r["family"] == family and r.get(key) is not None:
            out.setdefault(r["variant"], {})[r["seed"]] = r[key]
    return out


def paired(vals, base):
    seeds = sorted(set(vals) & set(base))
    d = [vals[s] - base[s] for s in seeds]
    return (*_ms(d), len(seeds)) if seeds else (None, None, 0)


def table(recs, family, order):
    vals = by_variant(recs, family)
    base = vals.get(DEFAULT, {})
    lines = ["| variant | cluster mIoU | paired Δ vs default | seeds |", "|---|---|---|---|"]
    rows = {}
    for v in order:
        if v not in vals:
            continue
        m, s = _ms(list(vals[v].values()))
        dm, ds, n = paired(vals[v], base) if v != DEFAULT else (None, None, len(vals[v]))
        rows[v] = (m, s, dm, ds, n)
        delta = "–" if dm is None else f"{dm:+.1f} ± {ds:.1f}"
        lines.append(f"| {v} | {m:.1f} ± {s:.1f} | {delta} | {n} |")
    return lines, rows


def level_table(recs, family, order):
    """Per variant: mean mIoU of each level against its granularity (strict, many-to-one in
    brackets), the mean consistency of each adjacent pair with a blind plan's in brackets, and the
    finest pair's consistency paired by seed against the default's (mean ± std of the per-seed
    differences, and on how many seeds it is higher)."""
    lines = ["| variant | levels: clusters → granularity: strict mIoU (many-to-one) | consistency child→parent "
             "(blind plan) | finest pair: paired Δ vs default (seeds higher) |", "|---|---|---|---|"]
    finest = {}
    for r in recs:
        if r["family"] == family and r.get("consistency") and r["consistency"][0]["consistency"] is not None:
            finest.setdefault(r["variant"], {})[r["seed"]] = r["consistency"][0]["consistency"]
    base = finest.get(DEFAULT, {})
    for v in order:
        rs = [r for r in recs if r["family"] == family and r["variant"] == v and r.get("levels")]
        if not rs:
            continue
        cells = []
        for i, e in enumerate(rs[0]["levels"]):
            if e["granularity"] is None:
                cells.append(f"{e['clusters']} → –")
                continue
            m = np.mean([r["levels"][i]["miou"] for r in rs])
            mo = np.mean([r["levels"][i]["many_to_one_miou"] for r in rs])
            cells.append(f"{e['clusters']} → {e['granularity']}: {m:.1f} ({mo:.1f})")
        cons = []
        for i, c in enumerate(rs[0]["consistency"]):
            xs = [r["consistency"][i]["consistency"] for r in rs if r["consistency"][i]["consistency"] is not None]
            ch = [r["consistency"][i]["consistency_chance"] for r in rs
                  if r["consistency"][i]["consistency_chance"] is not None]
            cons.append(f"L{c['child']}→L{c['parent']} {np.mean(xs):.2f} ({np.mean(ch):.2f})" if xs else
                        f"L{c['child']}→L{c['parent']} –")
        delta = "–"
        if v != DEFAULT and v in finest:
            dm, ds, n = paired(finest[v], base)
            if n:
                higher = sum(finest[v][k] > base[k] for k in set(finest[v]) & set(base))
                delta = f"{dm:+.2f} ± {ds:.2f} ({higher}/{n})"
        lines.append(f"| {v} | {'; '.join(cells)} | {'; '.join(cons) or '–'} | {delta} |")
    return lines


def bases_table(recs, family):
    """Per base: the base alone, k-means on its code, OMH on it (cluster mIoU, mean ± std), OMH's
    paired gain over each of the two (mean ± std of the per-seed differences, seeds higher), and
    the finest level pair's consistency of OMH on it. Then OMH on each other base against OMH on
    STEGO."""
    vals = by_variant(recs, family)
    lines = ["| base | alone (its probe) | k-means on its code | OMH on it | OMH − alone | OMH − k-means | "
             "finest pair consistency |", "|---|---|---|---|---|---|---|"]

    def ms(v):
        m, s = _ms(list(vals[v].values()))
        return f"{m:.1f} ± {s:.1f}"

    def gain(a, b):
        dm, ds, n = paired(vals[a], vals[b])
        higher = sum(vals[a][k] > vals[b][k] for k in set(vals[a]) & set(vals[b]))
        return f"{dm:+.1f} ± {ds:.1f} ({higher}/{n})"

    for base, (alone, km, omh) in BASES.items():
        if not all(v in vals for v in (alone, km, omh)):
            continue
        cons = [r["consistency"][0]["consistency"] for r in recs if r["family"] == family and r["variant"] == omh
                and r.get("consistency") and r["consistency"][0]["consistency"] is not None]
        lines.append(f"| {base} | {ms(alone)} | {ms(km)} | {ms(omh)} | {gain(omh, alone)} | {gain(omh, km)} | "
                     f"{np.mean(cons):.2f} |")
    others = [f"{omh} − OMH on STEGO: {gain(omh, DEFAULT)}" for _, (_, _, omh) in list(BASES.items())[1:]
              if all(v in vals for v in (DEFAULT, omh))]
    if others:
        lines += ["", "; ".join(others) + " (paired by seed)"]
    return lines


def decide(all_rows):
    """The rule: adopted iff mean paired gain > 0 on every rule family and > its spread on one."""
    cands, verdicts = [], {}
    variants = set.intersection(*(set(all_rows[f]) for f in RULE_FAMILIES)) - {DEFAULT}
    for v in sorted(variants):
        ds = [all_rows[f][v][2:4] for f in RULE_FAMILIES]
        if any(d[0] is None for d in ds):
            continue
        positive = all(d[0] > 0 for d in ds)
        clear = any(d[0] > d[1] for d in ds)
        passes = positive and clear
        verdicts[v] = passes
        if passes and v not in REFERENCES:
            cands.append((np.mean([d[0] for d in ds]), v))
    return (max(cands)[1] if cands else None), verdicts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results")
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args(argv)
    recs, bad = load(a.results)
    fams = [f for f in ("flat", "tree", "demo") if any(r["family"] == f for r in recs)]
    order = list(dict.fromkeys(r["variant"] for r in recs))
    head = [DEFAULT, *[v for v in REFERENCES if v in order], "through plan"]
    order = [v for v in head if v in order] + [v for v in order if v not in head]
    out, all_rows = [], {}
    for f in fams:
        lines, rows = table(recs, f, order)
        all_rows[f] = rows
        out += [f"### Family `{f}`: eval-level cluster mIoU", "", *lines, "",
                "Per level (mean over seeds; one-to-one strict mIoU, many-to-one in brackets) and hierarchy "
                "consistency (many-to-one at the parent's granularity; a blind plan's in brackets):", "",
                *level_table(recs, f, order), ""]
    if any(v in order for b in list(BASES)[1:] for v in BASES[b]):
        out += ["### The bases side by side: each alone and with OMH on top", ""]
        for f in fams:
            out += [f"Family `{f}`:", "", *bases_table(recs, f), ""]
    if all(f in all_rows for f in RULE_FAMILIES):
        adopted, verdicts = decide(all_rows)
        out += ["### The rule", ""]
        for v, ok in verdicts.items():
            ds = ", ".join(f"{f} {all_rows[f][v][2]:+.1f} ± {all_rows[f][v][3]:.1f}" for f in RULE_FAMILIES)
            out.append(f"- {v}: {'passes' if ok else 'fails'} ({ds}){' (reference, not a candidate)' if v in REFERENCES else ''}")
        out += ["", f"**Adopted: {adopted or 'none: the defaults stay'}**", ""]
    if bad:
        out += ["Failed jobs:", *[f"- {r['family']} {r['variant']} seed {r['seed']}: {r['error']}" for r in bad]]
    text = "\n".join(out)
    print(text)
    if a.markdown:
        from omh_ref.core.files import write_text

        write_text(a.markdown, text + "\n")


if __name__ == "__main__":
    sys.exit(main())
