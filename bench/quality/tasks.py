#!/usr/bin/env python3
"""The task suite of the quality benchmark: 36 tasks in 9 families, every answer exactly checkable.

Each example is {"prompt", "completion"}: the prompt is raw text (no chat template) ending right
before the answer, the completion is the answer with a leading space, one line, a few tokens.
Tasks of one family share the prompt format and the skill (only the instruction or the asked field
changes); families differ in both. Inputs are distinct within a task, so the splits
(samples: the 10 examples the clustering sees, test: >= 40 held out, train: the rest, up to
--train) are disjoint by input. Everything is drawn from one seeded RNG per task.

Data comes from packages: num2words (number words in four languages), babel (country and month
names), faker (an English word list and first names); the short category lists below are ours.

Writes <out>/{train,samples,test}/<task>.jsonl and <out>/tasks.json ({"tasks": {task: {"family",
"train", "samples", "test"}}, "seed"}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path
from typing import Callable

from common import TASKS, log, write_atomic

SEED = 20240817
N_SAMPLES = 10
N_TEST = 40

ANIMALS = """cat dog horse cow sheep goat pig rabbit mouse rat lion tiger bear wolf fox deer moose zebra giraffe
elephant monkey gorilla camel donkey kangaroo koala panda otter beaver squirrel hedgehog bat whale dolphin shark
seal walrus penguin eagle hawk owl parrot pigeon crow swan duck goose chicken turkey frog toad snake lizard turtle
crocodile alligator spider ant bee wasp butterfly moth beetle snail octopus squid crab lobster salmon trout
cheetah leopard jaguar hippo rhino buffalo bison hamster ferret raccoon skunk badger""".split()
FOODS = """bread butter cheese apple banana orange grape lemon cherry peach pear plum mango melon carrot potato
tomato onion garlic pepper rice pasta noodle soup salad pizza burger sandwich cookie cake pie muffin pancake
waffle yogurt cream honey jam sugar salt flour egg bacon sausage steak chicken coffee tea juice milk chocolate
popcorn cereal oatmeal broccoli spinach lettuce cucumber pumpkin avocado coconut pineapple strawberry""".split()
FOODS = [f for f in FOODS if f not in ANIMALS]
COLORS = "red blue green yellow black white purple orange pink brown gray silver golden violet".split()
POSITIVE = """good great happy kind lovely nice wonderful excellent brilliant cheerful friendly gentle joyful
pleasant splendid superb delightful charming generous honest brave calm clever graceful helpful polite proud
peaceful perfect fantastic marvelous awesome beautiful bright caring elegant fair fresh glad healthy hopeful
loyal lucky patient positive radiant reliable smart strong successful sweet talented warm wise""".split()
NEGATIVE = """bad awful terrible horrible sad angry cruel nasty rude mean ugly evil lazy selfish dishonest
bitter boring clumsy cowardly dirty dreadful gloomy greedy grumpy harsh hostile jealous miserable nervous
painful pathetic poor rotten scary sick stupid tense tired toxic unfair unhappy unkind upset useless weak
wicked worried wrong gross hateful hopeless lousy""".split()
CITIES = """Paris London Berlin Madrid Rome Vienna Prague Warsaw Lisbon Dublin Oslo Stockholm Helsinki Athens
Cairo Lagos Nairobi Tokyo Osaka Seoul Beijing Shanghai Delhi Mumbai Bangkok Jakarta Manila Sydney Melbourne
Toronto Chicago Boston Denver Seattle Miami Dallas Houston Atlanta Phoenix Lima Bogota Santiago Havana Moscow
Kyiv Istanbul Dubai Tehran Riyadh Amsterdam Brussels Zurich Geneva Munich Hamburg Milan Naples Barcelona
Seville Porto""".split()
ITEMS = "cups hats books pens chairs shirts boxes balls lamps bags coins shoes plates candles tickets maps".split()


def words() -> list[str]:
    from faker.providers.lorem.en_US import Provider
    return sorted({w for w in Provider.word_list if w.isalpha() and w.islower() and 3 <= len(w) <= 9})


def first_names() -> list[str]:
    from faker.providers.person.en_US import Provider
    names = set(Provider.first_names_female) | set(Provider.first_names_male)
    return sorted(n for n in names if n.isalpha() and 3 <= len(n) <= 8)


def countries() -> list[str]:
    from babel import Locale
    return sorted({v for k, v in Locale("en").territories.items() if len(k) == 2 and k.isalpha() and v.isalpha()})


def month_names(lang: str) -> list[str]:
    from babel import Locale
    wide = Locale(lang).months["format"]["wide"]
    return [wide[m] for m in range(1, 13)]


# A task: (family, key sampler, renderer). The sampler returns distinct input keys in a seeded
# random order; the renderer turns a key into (prompt, answer).
Task = tuple[str, Callable[[random.Random], list], Callable[[object], tuple[str, str]]]


def shuffled(rng: random.Random, items) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def distinct(rng: random.Random, draw: Callable[[random.Random], object], n: int = 2000) -> list:
    seen, out = set(), []
    for _ in range(n * 20):
        k = draw(rng)
        if k not in seen:
            seen.add(k)
            out.append(k)
            if len(out) == n:
                break
    return out


def str_task(instr: str, fn) -> tuple:
    return (lambda rng: shuffled(rng, words()),
            lambda w: (f"{instr}\nWord: {w}\nAnswer:", fn(w)))


def case_task(instr: str, fn) -> tuple:
    def keys(rng):
        ws = words()
        return distinct(rng, lambda r: tuple(r.sample(ws, r.choice((2, 3)))), 1500)
    return keys, lambda p: (f"{instr}\nPhrase: {' '.join(p)}\nResult:", fn(list(p)))


def arith_task(sym: str, draw) -> tuple:
    return (lambda rng: distinct(rng, draw, 1500),
            lambda k: (f"Calculate.\n{f' {sym} '.join(map(str, k))} =", str(eval(f' {sym} '.join(map(str, k))))))


def numword_task(lang: str, name: str) -> tuple:
    from num2words import num2words
    return (lambda rng: shuffled(rng, range(100)),
            lambda n: (f"Number to {name} words.\nNumber: {n}\nWords:", num2words(n, lang=lang)))


def date_task(instr: str, fn) -> tuple:
    import datetime as dt

    def keys(rng):
        start = dt.date(1950, 1, 1).toordinal()
        return distinct(rng, lambda r: dt.date.fromordinal(start + r.randrange(36500)).isoformat(), 1500)
    return keys, lambda d: (f"{instr}\nDate: {d}\nAnswer:", fn(d))


def unit_task(src: str, dst: str, factor: int) -> tuple:
    return (lambda rng: shuffled(rng, range(1, 1000)),
            lambda v: (f"Convert {v} {src} to {dst}.\nAnswer:", str(v * factor)))


def extract_task(field: str, pick) -> tuple:
    def keys(rng):
        names = first_names()
        return distinct(rng, lambda r: (r.choice(names), r.randint(2, 99), r.choice(COLORS), r.choice(ITEMS),
                                        r.choice(CITIES), r.randrange(2)), 1500)

    def render(k):
        name, n, color, item, city, form = k
        s = (f"{name} bought {n} {color} {item} in {city}." if form == 0
             else f"In {city}, {name} found {n} {color} {item}.")
        return f"Text: {s}\nFind the {field}.\nAnswer:", str(pick(k))
    return keys, render


def classify_task(question: str, positives: list[str], negatives: list[str]) -> tuple:
    def keys(rng):
        pos = shuffled(rng, sorted(set(positives)))
        neg = shuffled(rng, sorted(set(negatives) - set(positives)))
        out = []
        for i in range(min(len(pos), len(neg))):  # alternate so every split is balanced
            out += [(pos[i], True), (neg[i], False)]
        return out
    return keys, lambda k: (f"{question}\nWord: {k[0]}\nAnswer:", "yes" if k[1] else "no")


def list_task(instr: str, fn) -> tuple:
    return (lambda rng: distinct(rng, lambda r: tuple(r.randint(1, 50) for _ in range(r.randint(3, 5))), 1500),
            lambda xs: (f"{instr}\nList: {' '.join(map(str, xs))}\nAnswer:", str(fn(xs))))


def all_tasks() -> dict[str, tuple]:
    others = lambda *exclude: [w for lst in (ANIMALS, FOODS, COLORS, POSITIVE + NEGATIVE, countries())
                               if lst not in exclude for w in lst]
    t = {
        "str-first-letter": ("str", *str_task("Give the first letter of the word.", lambda w: w[0])),
        "str-last-letter": ("str", *str_task("Give the last letter of the word.", lambda w: w[-1])),
        "str-capitalize": ("str", *str_task("Capitalize the word.", lambda w: w.capitalize())),
        "str-double": ("str", *str_task("Repeat the word twice.", lambda w: f"{w} {w}")),
        "case-snake": ("case", *case_task("Write it in snake_case.", lambda p: "_".join(p))),
        "case-kebab": ("case", *case_task("Write it in kebab-case.", lambda p: "-".join(p))),
        "case-camel": ("case", *case_task("Write it in camelCase.", lambda p: p[0] + "".join(w.capitalize() for w in p[1:]))),
        "case-upper": ("case", *case_task("Write it in upper case.", lambda p: " ".join(p).upper())),
        "arith-add": ("arith", *arith_task("+", lambda r: (r.randint(1, 60), r.randint(1, 40)))),
        "arith-sub": ("arith", *arith_task("-", lambda r: (lambda a: (a, r.randint(1, a)))(r.randint(10, 99)))),
        "arith-mul": ("arith", *arith_task("*", lambda r: (r.randint(2, 12), r.randint(2, 12)))),
        "arith-add3": ("arith", *arith_task("+", lambda r: (r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)))),
        "numword-en": ("numword", *numword_task("en", "English")),
        "numword-fr": ("numword", *numword_task("fr", "French")),
        "numword-de": ("numword", *numword_task("de", "German")),
        "numword-es": ("numword", *numword_task("es", "Spanish")),
        "date-month-en": ("date", *date_task("Name the month in English.", lambda d: month_names("en")[int(d[5:7]) - 1])),
        "date-month-fr": ("date", *date_task("Name the month in French.", lambda d: month_names("fr")[int(d[5:7]) - 1])),
        "date-month-de": ("date", *date_task("Name the month in German.", lambda d: month_names("de")[int(d[5:7]) - 1])),
        "date-day": ("date", *date_task("Give the day of the month.", lambda d: str(int(d[8:])))),
        "unit-km-m": ("unit", *unit_task("km", "m", 1000)),
        "unit-m-cm": ("unit", *unit_task("m", "cm", 100)),
        "unit-cm-mm": ("unit", *unit_task("cm", "mm", 10)),
        "unit-kg-g": ("unit", *unit_task("kg", "g", 1000)),
        "extract-name": ("extract", *extract_task("name", lambda k: k[0])),
        "extract-number": ("extract", *extract_task("number", lambda k: k[1])),
        "extract-color": ("extract", *extract_task("color", lambda k: k[2])),
        "extract-city": ("extract", *extract_task("city", lambda k: k[4])),
        "classify-animal": ("classify", *classify_task("Is it an animal? Say yes or no.", ANIMALS, others(ANIMALS))),
        "classify-food": ("classify", *classify_task("Is it a food? Say yes or no.", FOODS, others(FOODS))),
        "classify-country": ("classify", *classify_task("Is it a country? Say yes or no.", countries(), others())),
        "classify-positive": ("classify", *classify_task("Is it a positive word? Say yes or no.", POSITIVE, NEGATIVE)),
        "list-max": ("list", *list_task("Give the largest number.", max)),
        "list-min": ("list", *list_task("Give the smallest number.", min)),
        "list-last": ("list", *list_task("Give the last number.", lambda xs: xs[-1])),
        "list-count": ("list", *list_task("Count the numbers.", len)),
    }
    return t


def task_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def generate(out: Path, n_train: int, seed: int) -> dict:
    meta = {}
    for name, (family, keys, render) in all_tasks().items():
        assert name.startswith(family + "-")
        ks = keys(random.Random(task_seed(name, seed)))
        assert len(set(ks)) == len(ks), name
        need = N_SAMPLES + N_TEST
        if len(ks) < need + 20:
            raise SystemExit(f"{name}: only {len(ks)} distinct inputs")
        splits = {"samples": ks[:N_SAMPLES], "test": ks[N_SAMPLES:need], "train": ks[need:need + n_train]}
        for split, keys_ in splits.items():
            rows = []
            for k in keys_:
                prompt, answer = render(k)
                assert "\n" not in answer and answer == answer.strip() and answer, (name, k, answer)
                rows.append(json.dumps({"prompt": prompt, "completion": " " + answer}, ensure_ascii=False))
            write_atomic(out / split / f"{name}.jsonl", "\n".join(rows) + "\n")
        meta[name] = {"family": family, **{s: len(v) for s, v in splits.items()}}
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TASKS)
    ap.add_argument("--train", type=int, default=300, help="training examples per task (fewer where inputs run out)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    meta = generate(args.out, args.train, args.seed)
    families = sorted({m["family"] for m in meta.values()})
    write_atomic(args.out / "tasks.json", json.dumps({"seed": args.seed, "families": families, "tasks": meta}, indent=1))
    log(f"{len(meta)} tasks in {len(families)} families written to {args.out}")


if __name__ == "__main__":
    main()
