"""Ratings -> preference pairs (prompt, chosen, rejected) for reward modelling and DPO.

Per item, each reviewer's latest non-skip verdict is a vote: a candidate, or "tie". The candidate
with the most votes is chosen if it has a strict plurality and at least `min_agreement` of the
votes; each other candidate becomes a rejected response. Items whose plurality is "tie", whose top
candidates share the plurality, or whose agreement is too low are dropped and counted by reason.
"""

from __future__ import annotations

from collections import Counter

from tunesmith.feedback.store import Store


def export_pairs(store: Store, min_agreement: float = 0.5) -> tuple[list[dict], dict]:
    latest: dict[tuple[str, str], dict] = {}
    for rating in store.ratings():  # in time order: a reviewer's later verdict on an item replaces the earlier
        if rating["verdict"] != "skip":
            latest[(rating["item_id"], rating["reviewer"])] = rating
    votes: dict[str, list] = {}
    for (item, _), rating in latest.items():
        votes.setdefault(item, []).append("tie" if rating["verdict"] == "tie" else rating["best"])
    pairs, dropped, agreements = [], Counter(), []
    items = {i.id: i for i in store.items()}
    for item_id, cast in votes.items():
        item = items[item_id]
        ranked = Counter(cast).most_common()
        top, count = ranked[0]
        if len(ranked) > 1 and ranked[1][1] == count:
            dropped["no majority"] += 1
            continue
        if top == "tie":
            dropped["tie"] += 1
            continue
        agreement = count / len(cast)
        if agreement < min_agreement:
            dropped["low agreement"] += 1
            continue
        agreements.append(agreement)
        chosen = item.candidates[top]
        for index, other in enumerate(item.candidates):
            if index != top:
                pairs.append({"prompt": item.prompt, "chosen": chosen["text"], "rejected": other["text"],
                              "raters": len(cast), "agreement": round(agreement, 4), "item_id": item_id,
                              "chosen_source": chosen.get("source"), "rejected_source": other.get("source")})
    raters = [len(v) for v in votes.values()]
    stats = {"items": len(items), "rated_items": len(votes), "pairs": len(pairs),
             "exported_items": len(agreements), "dropped": dict(dropped),
             "mean_raters": sum(raters) / len(raters) if raters else 0.0,
             "mean_agreement": sum(agreements) / len(agreements) if agreements else 0.0,
             "ratings": len(store.ratings())}
    return pairs, stats
