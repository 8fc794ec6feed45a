"""Synthetic e-commerce behaviour log, seeded and deterministic.

    ecomtrain data synth --out data/synth --users 2000 --items 600

What it models (so that a recommender has something real to learn):
- items have a category, a brand (brands live in one or two categories), a
  log-normal price around a category level, and a generated title holding the
  brand, a product-line name shared by runs of 4 items of a series, the category
  noun and a size: text that correlates with behaviour (same category, brand,
  price level and line => similar sequences), so text and cold-start items work;
- popularity is Zipf-like (exponent 1.0) over a random item order;
- items form "series" inside a category (shampoo -> conditioner): after an item
  a shopper often looks at its successor, a sequential signal popularity
  cannot capture;
- users have latent tastes: a Dirichlet(0.3) mix of categories, favourite
  brands and a preferred price level;
- sessions on a channel (app, web, mini_program) follow the funnel
  view -> click -> cart -> purchase, and consumables are re-bought later
  (repeat purchases).

Optional planted signals (all off by default: the default log is unchanged, draw for draw):
- ``behaviour_signal``: the funnel stage decides what comes next: after an item is carted or
  bought the shopper moves to its series successor (a complement, p=0.8); after a view or
  click only, to its *substitute* (a second fixed cycle in the category, p=0.8). And carts
  left without a purchase come back: at a later session start, with p=0.5, the user returns
  to an abandoned cart and buys it with p=0.8. So the event type of a history step tells the
  next item, and a past cart tells a future purchase.
- ``channel_signal``: conversion depends on the session's channel: the click, cart and
  purchase probabilities are multiplied by 1.6 on the app, 0.5 on the web and 1.0 on the
  mini program (capped at 0.95). The channel of the latest steps predicts whether the next
  one is bought.
- ``ratings``: every purchase is followed by a 'rating' event (value 1..5, rounded):
  3.4 + item bias N(0, 0.4) + user bias N(0, 0.3) + 1.2 if the user bought the item before
  + 1.0 if the brand is one of the user's favourites (else -0.5) - 0.8 x |log price -
  the user's preferred log price| + 0.7 on the app / -0.7 on the web + N(0, 0.3):
  structure beyond user and item biases that a model can read from the history (repeat
  items, the brands and prices it holds, the channel of the ongoing session).

Writes ``OUT/events.parquet`` (user_id, item_id, timestamp, event_type,
channel, value) and ``OUT/items.parquet`` (item_id, title, category, brand, price).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ADJ = ["Daily", "Pure", "Ultra", "Soft", "Fresh", "Classic", "Pro", "Gentle", "Deep", "Light", "Rich", "Active"]
_CAT_NOUNS = [
    "Shampoo", "Conditioner", "Face Cream", "Lipstick", "Mascara", "Serum", "Sunscreen", "Body Wash",
    "Nail Polish", "Perfume", "Hair Oil", "Toner", "Cleanser", "Eye Liner", "Foundation", "Blush",
    "Hand Cream", "Face Mask", "Razor", "Deodorant",
]
_CHANNELS = ["app", "web", "mini_program"]
_RATE_CHANNEL = {"app": 0.7, "web": -0.7}  # ratings: shoppers on the app rate higher than on the web
_SYL = ["ka", "lo", "mi", "re", "su", "ta", "vi", "no", "pe", "zu", "ra", "el", "on", "is", "da", "fo"]


def _line_name(category: int, run: int) -> str:
    """A pronounceable product-line name, unique per (category, run), e.g. 'Kalomi'."""
    n = category * 1009 + run
    syl = [_SYL[(n >> (4 * k)) % 16] for k in range(3)]
    return ("".join(syl) + str(n // 4096 or "")).capitalize()


def generate(
    num_users: int = 2000,
    num_items: int = 600,
    num_categories: int = 12,
    num_brands: int = 40,
    days: int = 120,
    sessions_per_user: float = 6.0,
    seed: int = 0,
    behaviour_signal: bool = False,
    channel_signal: bool = False,
    ratings: bool = False,
):
    """Return (events, items) as polars DataFrames."""
    import polars as pl

    rng = np.random.default_rng(seed)
    C, B, N = num_categories, num_brands, num_items

    # ---- catalog
    cat_sizes = rng.dirichlet(np.full(C, 2.0)) * N
    item_cat = np.repeat(np.arange(C), np.maximum(1, np.round(cat_sizes).astype(int)))[:N]
    if len(item_cat) < N:
        item_cat = np.concatenate([item_cat, rng.integers(0, C, N - len(item_cat))])
    rng.shuffle(item_cat)
    brand_home = [rng.choice(C, size=rng.integers(1, 3), replace=False) for _ in range(B)]
    cat_brands = [[b for b in range(B) if c in brand_home[b]] or [int(rng.integers(B))] for c in range(C)]
    item_brand = np.array([rng.choice(cat_brands[c]) for c in item_cat])
    cat_price = rng.uniform(np.log(5), np.log(80), C)
    brand_premium = rng.normal(0, 0.4, B)
    item_logp = cat_price[item_cat] + brand_premium[item_brand] + rng.normal(0, 0.25, N)
    item_price = np.round(np.exp(item_logp), 2)
    popularity = 1.0 / np.arange(1, N + 1) ** 1.0
    popularity = popularity[rng.permutation(N)]
    consumable = rng.random(N) < 0.4
    # series: a random cycle inside each category gives every item a successor
    successor = np.arange(N)
    cat_items = [np.flatnonzero(item_cat == c) for c in range(C)]
    # product lines: runs of 4 consecutive items of a series share a line name in their title,
    # so item text carries part of the sequential signal (and cold items can be placed by text);
    # names are a pure function of (category, run), so no extra random draws: the events are
    # the same as before lines existed
    item_line = [""] * N
    for c, items in enumerate(cat_items):
        order = rng.permutation(items) if len(items) > 1 else items
        if len(items) > 1:
            successor[order] = np.roll(order, -1)
        for k, i in enumerate(order):
            item_line[i] = _line_name(c, k // 4)

    # planted-signal state: its own generator, so the default log is unchanged draw for draw
    prng = np.random.default_rng([seed, 7919])
    substitute = np.arange(N)
    for items in cat_items:
        if len(items) > 1:
            order = prng.permutation(items)
            substitute[order] = np.roll(order, -1)
    item_bias = prng.normal(0, 0.4, N)
    conv = {"app": 1.6, "web": 0.5, "mini_program": 1.0} if channel_signal else {}

    def p(base: float, ch: str) -> float:
        return min(0.95, base * conv.get(ch, 1.0))

    titles = [
        f"{'Brand' + str(item_brand[i]).zfill(2)} {item_line[i]} {_ADJ[rng.integers(len(_ADJ))]} "
        f"{_CAT_NOUNS[item_cat[i] % len(_CAT_NOUNS)]} {int(rng.integers(50, 500))}ml"
        for i in range(N)
    ]
    item_ids = [f"SKU{i:06d}" for i in range(N)]

    # ---- users and their events
    t0 = 1_700_000_000  # 2023-11-14, a fixed epoch keeps the output deterministic
    span = days * 86400
    cols: dict[str, list] = {k: [] for k in ("user_id", "item_id", "timestamp", "event_type", "channel", "value")}

    def emit(u: int, i: int, t: int, ev: str, ch: str, value=None) -> None:
        cols["user_id"].append(f"U{u:07d}")
        cols["item_id"].append(item_ids[i])
        cols["timestamp"].append(t)
        cols["event_type"].append(ev)
        cols["channel"].append(ch)
        cols["value"].append(value if value is not None else (float(item_price[i]) if ev in ("cart", "purchase") else None))

    def rate(u: int, i: int, t: int, ch: str, ub: float, fav, pref: float, before: bool) -> int:
        r = 3.4 + item_bias[i] + ub + (1.2 if before else 0.0) + (1.0 if item_brand[i] in fav else -0.5)
        r += -0.8 * abs(item_logp[i] - pref) + _RATE_CHANNEL.get(ch, 0.0) + prng.normal(0, 0.3)
        emit(u, i, t, "rating", ch, float(np.clip(np.round(r), 1, 5)))
        return t + int(prng.integers(5, 30))

    for u in range(num_users):
        taste = rng.dirichlet(np.full(C, 0.3))
        fav_brands = rng.choice(B, size=3, replace=False)
        brand_aff = np.ones(B)
        brand_aff[fav_brands] = 4.0
        price_pref = rng.normal(np.log(25), 0.6)
        p_channel = rng.dirichlet([3.0, 2.0, 1.0])
        n_sessions = 1 + rng.poisson(max(sessions_per_user - 1, 0.0))
        starts = np.sort(rng.integers(0, span, n_sessions)) + t0
        bought: list[int] = []
        abandoned: list[int] = []
        user_bias = prng.normal(0, 0.3) if ratings else 0.0

        def purchase(i: int, t: int, ch: str) -> int:
            if ratings:
                t = rate(u, i, t, ch, user_bias, fav_brands, price_pref, i in bought)
            bought.append(i)
            return t

        for s_start in starts:
            ch = _CHANNELS[rng.choice(3, p=p_channel)]
            t = int(s_start)
            if behaviour_signal and abandoned and prng.random() < 0.5:  # back to an abandoned cart
                i = abandoned.pop(int(prng.integers(len(abandoned))))
                for ev in ("view", "cart"):
                    emit(u, i, t, ev, ch)
                    t += int(prng.integers(5, 90))
                if prng.random() < 0.8:
                    emit(u, i, t, "purchase", ch)
                    t = purchase(i, t + int(prng.integers(5, 60)), ch)
            if bought and rng.random() < 0.25:  # repeat purchase of a consumable
                i = bought[rng.integers(len(bought))]
                if consumable[i]:
                    for ev in ("view", "cart", "purchase"):
                        emit(u, i, t, ev, ch)
                        t += int(rng.integers(5, 90))
                    if ratings:
                        bought.pop()  # purchase() appends it again, after rating it as a repeat
                        t = purchase(i, t, ch)
            c = rng.choice(C, p=taste)
            items = cat_items[c]
            if len(items) == 0:
                continue
            w = popularity[items] * brand_aff[item_brand[items]] * np.exp(-0.5 * ((item_logp[items] - price_pref) / 0.7) ** 2)
            w = w / w.sum()
            i = int(rng.choice(items, p=w))
            for _ in range(1 + rng.geometric(0.35)):
                emit(u, i, t, "view", ch)
                t += int(rng.integers(5, 120))
                stage = 0
                if rng.random() < p(0.55, ch):
                    emit(u, i, t, "click", ch)
                    t += int(rng.integers(5, 120))
                    stage = 1
                    if rng.random() < p(0.3, ch):
                        emit(u, i, t, "cart", ch)
                        t += int(rng.integers(5, 60))
                        stage = 2
                        if rng.random() < p(0.6, ch):
                            emit(u, i, t, "purchase", ch)
                            t += int(rng.integers(5, 60))
                            stage = 3
                            if ratings:
                                t = purchase(i, t, ch)
                            else:
                                bought.append(i)
                if behaviour_signal and stage == 2:
                    abandoned.append(i)
                # next item: the series successor (sequential signal) or a fresh pick
                if behaviour_signal:
                    nxt = successor[i] if stage >= 2 else substitute[i]
                    i = int(nxt) if prng.random() < 0.8 else int(rng.choice(items, p=w))
                else:
                    i = int(successor[i]) if rng.random() < 0.6 else int(rng.choice(items, p=w))

    events = pl.DataFrame(
        cols,
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "event_type": pl.Utf8, "channel": pl.Utf8, "value": pl.Float64},
    )
    items_df = pl.DataFrame(
        {
            "item_id": item_ids,
            "title": titles,
            "category": [_CAT_NOUNS[c % len(_CAT_NOUNS)] + (f" {c // len(_CAT_NOUNS)}" if c >= len(_CAT_NOUNS) else "") for c in item_cat],
            "brand": [f"Brand{b:02d}" for b in item_brand],
            "price": item_price,
        }
    )
    return events, items_df


def write(out: str | Path, **kwargs) -> dict:
    """Generate and write ``events.parquet`` + ``items.parquet``; returns a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events, items = generate(**kwargs)
    events.write_parquet(out / "events.parquet")
    items.write_parquet(out / "items.parquet")
    counts = dict(events.group_by("event_type").len().sort("event_type").iter_rows())
    return {"out": str(out), "events": events.height, "users": events["user_id"].n_unique(), "items": items.height, "by_event_type": counts}
