"""A plain pandas implementation of the selection rule (docs/design.md), row by row where the rule is, for tests."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa

from ns_data.hashing import hash_ids


def _reason(row, num_classes) -> str | None:
    upper = 2**31 - 1 if num_classes is None else num_classes - 1
    if row["id"] is None or row["id"] == "":
        return "missing_id"
    if row["label"] is None or pd.isna(row["label"]):
        return "missing_label"
    if not 0 <= int(row["label"]) <= upper:
        return "label_out_of_range"
    if row["confidence"] is None:
        return "missing_confidence"
    c = np.float32(row["confidence"])
    if not np.isfinite(c):
        return "confidence_not_finite"
    if c < 0 or c > 1:
        return "confidence_out_of_range"
    if row.get("topk_classes") is not None and any(k is None or not 0 <= k <= upper for k in row["topk_classes"]):
        return "topk_out_of_range"
    lists = [row[c] for c in ("topk_probs", "probs") if row.get(c) is not None]
    for reason, fails in (("probs_not_finite", lambda v: any(p is None or not np.isfinite(p) for p in v)),
                          ("probs_negative", lambda v: any(p is not None and p < 0 for p in v)),
                          ("probs_sum_over_one",
                           lambda v: sum(p for p in v if p is not None and np.isfinite(p)) > 1 + 1e-3)):
        if any(fails(v) for v in lists):
            return reason
    return None


def reference(table: pa.Table, per_class: int, min_confidence: float = 0.3, upsample: bool = True,
              seed: int = 0, num_classes: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selection with rank and copies, rejected rows with reason), both sorted by id."""
    rows = table.to_pylist()
    df = pd.DataFrame({"i": range(len(rows))})
    df["reason"] = [_reason(r, num_classes) for r in rows]
    valid = df["reason"].isna()
    # Repeated ids among valid rows: keep the most confident, then lowest label, then smallest content digest.
    df["id"] = [r["id"] for r in rows]
    df["conf"] = [np.float32(r["confidence"]) if r["confidence"] is not None else np.nan for r in rows]
    df["label"] = [r["label"] for r in rows]
    df["digest"] = [hashlib.sha256(repr(sorted(r.items())).encode()).hexdigest() for r in rows]
    v = df[valid].copy()
    v["neg_conf"] = -v["conf"]
    v = v.sort_values(["id", "neg_conf", "label", "digest", "i"])
    dup = v.duplicated("id", keep="first")
    df.loc[v.index[dup], "reason"] = "duplicate_id"
    valid = df["reason"].isna()
    cand = df[valid & (df["conf"].astype(np.float32) >= np.float32(min_confidence))].copy()
    cand["h"] = hash_ids(pa.array(cand["id"].tolist(), pa.string()), seed)
    cand = cand.sort_values(["label", "conf", "h", "id"],
                            ascending=[True, False, True, True], kind="stable")
    cand["rank"] = cand.groupby("label").cumcount()
    kept = cand[cand["rank"] < per_class].copy()
    n = kept.groupby("label")["id"].transform("size")
    kept["copies"] = (per_class // n + (kept["rank"] < per_class % n)) if upsample else 1
    selection = table.take(pa.array(kept["i"].to_numpy())).to_pandas()
    selection["rank"] = kept["rank"].to_numpy().astype(np.int32)
    selection["copies"] = np.asarray(kept["copies"]).astype(np.int32)
    bad = df[~df["reason"].isna()]
    errors = table.take(pa.array(bad["i"].to_numpy(), pa.int64())).to_pandas()
    errors["reason"] = bad["reason"].to_numpy()
    return (selection.sort_values("id", kind="stable").reset_index(drop=True),
            errors.sort_values(["id", "reason"], kind="stable").reset_index(drop=True))
