"""A generated text-to-SQL task in the format of the flagship paper's SQL task.

"Generate a SQL for the following question. <question> Table: CREATE TABLE <t> (<cols>)" -> one
query. Schemas, questions and answers are produced from the project's own domains with a seeded
RNG, so the task needs no hub; the metric is exact match after normalising whitespace
(tasks/realign_sql/utils.py).
"""

from __future__ import annotations

import random

# (table stem, entity singular, entity plural, text columns {col: (human name, values)},
#  integer columns {col: human name})
DOMAINS = [
    (
        "employees",
        "employee",
        "employees",
        {
            "department": ("department", ["Sales", "Finance", "Legal", "Research", "Support"]),
            "city": ("city", ["Boston", "Denver", "Austin", "Seattle", "Miami"]),
            "last_name": ("last name", ["Garcia", "Nguyen", "Smith", "Okafor", "Kowalski"]),
        },
        {"salary": "salary", "age": "age", "years_employed": "years employed"},
    ),
    (
        "books",
        "book",
        "books",
        {
            "author": ("author", ["Austen", "Achebe", "Tolstoy", "Morrison", "Borges"]),
            "genre": ("genre", ["Mystery", "Poetry", "History", "Fantasy", "Biography"]),
            "publisher": ("publisher", ["Penguin", "Vintage", "Orbit", "Faber", "Tor"]),
        },
        {"pages": "number of pages", "year": "publication year", "copies_sold": "copies sold"},
    ),
    (
        "matches",
        "match",
        "matches",
        {
            "home_team": ("home team", ["Arsenal", "Celtic", "Porto", "Ajax", "Napoli"]),
            "away_team": ("away team", ["Lyon", "Benfica", "Roma", "Everton", "Sevilla"]),
            "venue": ("venue", ["Wembley", "Anfield", "Camp Nou", "San Siro", "Ibrox"]),
        },
        {"attendance": "attendance", "home_score": "home score", "round": "round"},
    ),
    (
        "cars",
        "car",
        "cars",
        {
            "make": ("make", ["Toyota", "Volvo", "Honda", "Fiat", "Kia"]),
            "color": ("color", ["Red", "Blue", "Silver", "Black", "White"]),
            "fuel": ("fuel type", ["Diesel", "Petrol", "Electric", "Hybrid", "Gas"]),
        },
        {"price": "price", "mileage": "mileage", "doors": "number of doors"},
    ),
    (
        "flights",
        "flight",
        "flights",
        {
            "airline": ("airline", ["Delta", "Lufthansa", "Qantas", "Emirates", "Iberia"]),
            "origin": ("origin", ["Paris", "Tokyo", "Sydney", "Chicago", "Madrid"]),
            "destination": ("destination", ["Rome", "Dubai", "Lima", "Oslo", "Cairo"]),
        },
        {"duration": "duration", "passengers": "number of passengers", "gate": "gate"},
    ),
    (
        "albums",
        "album",
        "albums",
        {
            "artist": ("artist", ["Adele", "Queen", "Bjork", "Drake", "Shakira"]),
            "label": ("label", ["Island", "Sony", "Warp", "Atlantic", "Motown"]),
            "format": ("format", ["Vinyl", "Cassette", "Digital", "CD", "Box set"]),
        },
        {"tracks": "number of tracks", "release_year": "release year", "weeks_on_chart": "weeks on chart"},
    ),
    (
        "hospitals",
        "hospital",
        "hospitals",
        {
            "region": ("region", ["North", "South", "East", "West", "Central"]),
            "director": ("director", ["Patel", "Moreau", "Schmidt", "Ito", "Silva"]),
            "type": ("type", ["Teaching", "Private", "Public", "Children", "Rural"]),
        },
        {"beds": "number of beds", "staff": "staff count", "founded": "founding year"},
    ),
    (
        "courses",
        "course",
        "courses",
        {
            "instructor": ("instructor", ["Ahmed", "Brown", "Chen", "Diaz", "Evans"]),
            "subject": ("subject", ["Physics", "Art", "Economics", "Biology", "Music"]),
            "campus": ("campus", ["Riverside", "Hilltop", "Downtown", "Lakeside", "Northgate"]),
        },
        {"credits": "credits", "enrollment": "enrollment", "level": "level"},
    ),
]


def _question(rng: random.Random) -> tuple[str, str]:
    stem, one, many, text_cols, int_cols = rng.choice(DOMAINS)
    table = f"{stem}_{rng.randint(1, 99)}"
    # every question uses a subset of columns; the schema lists exactly those, as in the source task
    tcol, tcol2 = rng.sample(sorted(text_cols), 2)
    icol = rng.choice(sorted(int_cols))
    th, tvals = text_cols[tcol]
    t2h, t2vals = text_cols[tcol2]
    ih = int_cols[icol]
    val = rng.choice(tvals)
    n = rng.choice([3, 5, 10, 12, 20, 25, 50, 100, 250, 1000, 2000])
    kind = rng.randrange(6)
    if kind == 0:
        q = f"What is the {t2h} of the {one} whose {th} is {val}?"
        sql = f'SELECT {tcol2} FROM {table} WHERE {tcol} = "{val.lower()}"'
        cols = [(tcol2, "VARCHAR"), (tcol, "VARCHAR")]
    elif kind == 1:
        q = f"How many {many} have {val} as their {th}?"
        sql = f'SELECT COUNT({tcol2}) FROM {table} WHERE {tcol} = "{val.lower()}"'
        cols = [(tcol2, "VARCHAR"), (tcol, "VARCHAR")]
    elif kind == 2:
        q = f"What is the highest {ih} of {many} with the {th} {val}?"
        sql = f'SELECT MAX({icol}) FROM {table} WHERE {tcol} = "{val.lower()}"'
        cols = [(icol, "INTEGER"), (tcol, "VARCHAR")]
    elif kind == 3:
        q = f"What is the lowest {ih} of {many} with the {th} {val}?"
        sql = f'SELECT MIN({icol}) FROM {table} WHERE {tcol} = "{val.lower()}"'
        cols = [(icol, "INTEGER"), (tcol, "VARCHAR")]
    elif kind == 4:
        q = f"Which {th} has a {one} with {ih} greater than {n}?"
        sql = f"SELECT {tcol} FROM {table} WHERE {icol} > {n}"
        cols = [(tcol, "VARCHAR"), (icol, "INTEGER")]
    else:
        q = f"What is the average {ih} of {many} whose {th} is {val}?"
        sql = f'SELECT AVG({icol}) FROM {table} WHERE {tcol} = "{val.lower()}"'
        cols = [(icol, "INTEGER"), (tcol, "VARCHAR")]
    schema = f"CREATE TABLE {table} (" + ", ".join(f"{c} {t}" for c, t in cols) + ")"
    return f"Generate a SQL for the following question. {q} Table: {schema}", sql


def generate(n: int, seed: int) -> list[dict]:
    """n distinct {prompt, response} examples, deterministic in seed."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    while len(seen) < n:
        prompt, sql = _question(rng)
        seen.setdefault(prompt, sql)
    return [{"prompt": p, "response": r} for p, r in seen.items()]
