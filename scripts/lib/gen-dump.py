#!/usr/bin/env python3
"""Writes a series of SQL dumps, as pg_dump writes them, that change a little every night.

    gen-dump.py OUT_DIR NIGHTS MB [CHANGE_PERCENT]

writes OUT_DIR/night-01.sql … night-NN.sql, each about MB megabytes: a schema header, then a
COPY block of rows (id, name, e-mail, date, amount, a comment of dictionary words). Every night
CHANGE_PERCENT (default 1) of the rows change, as in an orders table: half of them are new rows
appended, half are updates of recent rows (among the last 1%: orders still being processed), so two consecutive dumps differ by
about that fraction of their bytes, near their end. (Updates spread uniformly over a dump would
change every chunk of any chunking deduplicator, gzip or not.) Deterministic: the same arguments
give the same files.

GEN_DUMP_LAYOUT=middle (default: tail) writes two tables instead, as pg_dump orders them by
name: a hot `accounts` table (a fifth of the bytes), where all of each night's changes happen
(updates of its recent rows, new rows appended to it), then a static `order_history` table
(the other four fifths). The changes then sit a fifth of the way into the dump, so a gzip of it
differs from the previous night's from there to its end: what a tool that sees only the .gz
must store again every night.
"""
import os
import random
import sys

WORDS = (
    "order invoice shipped pending refund customer account payment card balance total "
    "delivery address street city north south east west express standard returned "
    "warehouse stock item quantity discount coupon tax net gross priority note call "
    "email phone confirmed cancelled review rating great poor average fast slow box"
).split()
FIRST = "anna ben carla dirk eva farid greta hans ines jonas karl lena mona nils olga paul".split()
LAST = "meyer schulz weber fischer wagner becker hoffmann koch richter klein wolf neumann".split()


def row(rng, i):
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    mail = name.replace(" ", ".") + f"{rng.randrange(1000)}@example.com"
    date = f"20{rng.randrange(10, 27)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    amount = f"{rng.randrange(1, 100000) / 100:.2f}"
    comment = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 14)))
    return f"{i}\t{name}\t{mail}\t{date}\t{amount}\t{comment}\n"


HEADER = """--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SET client_encoding = 'UTF8';

CREATE TABLE public.orders (
    id bigint NOT NULL,
    name text,
    email text,
    created date,
    amount numeric(10,2),
    comment text
);

COPY public.orders (id, name, email, created, amount, comment) FROM stdin;
"""
FOOTER = "\\.\n\n--\n-- PostgreSQL database dump complete\n--\n"


HISTORY = """\\.

CREATE TABLE public.order_history (
    id bigint NOT NULL,
    name text,
    email text,
    created date,
    amount numeric(10,2),
    comment text
);

COPY public.order_history (id, name, email, created, amount, comment) FROM stdin;
"""


def table(rng, target):
    rows = []
    size = 0
    while size < target:
        r = row(rng, len(rows) + 1)
        rows.append(r)
        size += len(r)
    return rows


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    out, nights, mb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    change = float(sys.argv[4]) if len(sys.argv) == 5 else 1.0
    middle = os.environ.get("GEN_DUMP_LAYOUT", "tail") == "middle"
    os.makedirs(out, exist_ok=True)
    rng = random.Random(42)
    total = mb * 1e6 - len(HEADER) - len(FOOTER)
    header = HEADER.replace("orders", "accounts") if middle else HEADER
    rows = table(rng, total / 5 if middle else total)
    history = table(rng, total * 4 / 5) if middle else []
    all_rows = len(rows) + len(history)
    for night in range(1, nights + 1):
        if night > 1:
            n = max(2, int(all_rows * change / 100))
            recent = max(1, len(rows) // 100)
            for _ in range(n // 2):
                i = len(rows) - 1 - rng.randrange(recent)
                rows[i] = row(rng, i + 1)
            for _ in range(n - n // 2):
                rows.append(row(rng, len(rows) + 1))
        with open(os.path.join(out, f"night-{night:02d}.sql"), "w") as f:
            f.write(header)
            f.writelines(rows)
            if middle:
                f.write(HISTORY)
                f.writelines(history)
            f.write(FOOTER)


if __name__ == "__main__":
    main()
