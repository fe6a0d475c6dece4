"""The demo's tools (OpenAI schemas), and the exchanges that use them or miss them.

Tools: get_weather(city), add(a, b), lookup(word). When a question needs a tool that the
prompt lists, the assistant calls it (DeepSeek V3.1's call format, JSON arguments), reads
the result (JSON or plain text, written by whoever runs the tool) and answers from it;
when the tool is not listed it says what it would need. Small sums are answered without
the add tool unless the user asks for it.

Held out (never in a training conversation): 15% of the cities and of the looked-up words,
"Lisbon" and "serene" among them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data import Turn, add_answer, case, held_out

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city's name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers exactly.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up what an English word means.",
            "parameters": {
                "type": "object",
                "properties": {"word": {"type": "string"}},
                "required": ["word"],
            },
        },
    },
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]
TASK_TOOL = {"weather": "get_weather", "lookup": "lookup", "add_tool": "add"}

CITIES = (
    "Paris,London,Berlin,Madrid,Rome,Lisbon,Vienna,Prague,Warsaw,Dublin,Oslo,Stockholm,"
    "Helsinki,Copenhagen,Amsterdam,Brussels,Zurich,Geneva,Munich,Hamburg,Milan,Naples,"
    "Venice,Athens,Istanbul,Cairo,Lagos,Nairobi,Accra,Dakar,Tunis,Algiers,Casablanca,"
    "Marrakesh,Cape Town,Durban,Johannesburg,Addis Ababa,Kampala,Kigali,Luanda,Harare,"
    "Moscow,Kyiv,Minsk,Riga,Tallinn,Vilnius,Bucharest,Sofia,Belgrade,Zagreb,Budapest,"
    "Bratislava,Ljubljana,Sarajevo,Tirana,Valletta,Reykjavik,Edinburgh,Glasgow,Cardiff,"
    "Belfast,Manchester,Liverpool,Bristol,Lyon,Marseille,Bordeaux,Seville,Valencia,"
    "Barcelona,Porto,Tokyo,Osaka,Kyoto,Seoul,Busan,Beijing,Shanghai,Shenzhen,Hong Kong,"
    "Taipei,Manila,Hanoi,Bangkok,Jakarta,Singapore,Kuala Lumpur,Delhi,Mumbai,Chennai,"
    "Kolkata,Dhaka,Karachi,Lahore,Kabul,Tehran,Baghdad,Riyadh,Dubai,Doha,Muscat,Amman,"
    "Beirut,Jerusalem,Tbilisi,Yerevan,Baku,Tashkent,Almaty,Ulaanbaatar,Sydney,Melbourne,"
    "Perth,Brisbane,Adelaide,Auckland,Wellington,Honolulu,Anchorage,Vancouver,Toronto,"
    "Montreal,Ottawa,Calgary,Chicago,Boston,New York,Seattle,Denver,Austin,Dallas,Houston,"
    "Miami,Atlanta,Phoenix,Portland,San Diego,Los Angeles,San Francisco,Mexico City,"
    "Havana,Bogota,Lima,Quito,Caracas,Santiago,Buenos Aires,Montevideo,Asuncion,La Paz,"
    "Brasilia,Recife,Salvador,Panama,San Jose,Kingston,Nassau,Bern,Basel,Graz,Linz"
).split(",")

DEFINITIONS: dict[str, str] = {
    "serene": "calm, peaceful and untroubled",
    "vivid": "producing strong, clear images in the mind",
    "brisk": "quick and full of energy",
    "candid": "truthful and straightforward",
    "frugal": "careful not to waste money or food",
    "humble": "not proud; modest",
    "keen": "eager and enthusiastic",
    "lucid": "expressed clearly and easy to understand",
    "mellow": "soft, warm and pleasant",
    "nimble": "quick and light in movement",
    "placid": "not easily upset or excited",
    "rugged": "rough and uneven",
    "sturdy": "strongly built and hard to break",
    "timid": "showing a lack of courage",
    "vast": "very great in size",
    "witty": "clever and funny with words",
    "zealous": "full of eager enthusiasm",
    "ample": "enough or more than enough",
    "bleak": "cold, bare and without hope",
    "cozy": "warm and comfortable",
    "drowsy": "sleepy and tired",
    "eager": "wanting very much to do something",
    "fragile": "easily broken",
    "gloomy": "dark or sad",
    "hasty": "done too quickly",
    "idle": "not working or active",
    "jovial": "cheerful and friendly",
    "lavish": "rich and plentiful",
    "meek": "quiet and gentle",
    "noble": "having fine qualities",
    "obscure": "not well known or hard to understand",
    "prudent": "careful and sensible",
    "quaint": "attractively old-fashioned",
    "radiant": "shining brightly",
    "shrewd": "clever in practical matters",
    "tidy": "neat and in order",
    "urgent": "needing attention at once",
    "vague": "not clear or definite",
    "wary": "careful about possible danger",
    "yearn": "to want something very much",
    "zest": "great enthusiasm and energy",
    "anchor": "a heavy object that keeps a ship in place",
    "beacon": "a light that warns or guides",
    "canyon": "a deep valley with steep sides",
    "dune": "a hill of sand made by the wind",
    "ember": "a glowing piece of coal or wood in a dying fire",
    "fjord": "a long narrow sea inlet between high cliffs",
    "glacier": "a slow river of ice",
    "harbor": "a sheltered place for ships",
    "island": "land surrounded by water",
    "jungle": "a thick tropical forest",
    "kettle": "a pot for boiling water",
    "lantern": "a lamp with a protective case",
    "meadow": "a field of grass and flowers",
    "nectar": "a sweet liquid made by flowers",
    "orchard": "a piece of land with fruit trees",
    "pebble": "a small smooth stone",
    "quarry": "a place where stone is dug out",
    "ripple": "a small wave on water",
    "summit": "the highest point of a hill or mountain",
    "thicket": "a dense group of bushes",
    "umbrella": "a folding cover that keeps off rain",
    "valley": "low land between hills",
    "willow": "a tree with long thin branches",
    "yacht": "a boat for racing or pleasure",
    "zenith": "the highest point reached",
    "atlas": "a book of maps",
    "bridge": "a structure that crosses a river or road",
    "compass": "a tool that shows north",
    "diary": "a book for daily notes",
    "engine": "a machine that makes things move",
    "feather": "one of the light parts covering a bird",
    "galaxy": "a huge group of stars",
    "horizon": "the line where the earth meets the sky",
    "icicle": "a hanging spike of ice",
    "jigsaw": "a puzzle of pieces that fit together",
    "kernel": "the inner part of a seed or nut",
    "ladder": "a set of steps for climbing",
    "magnet": "a metal that attracts iron",
    "needle": "a thin pointed tool for sewing",
    "oasis": "a place with water in a desert",
    "puzzle": "a game or problem that tests skill",
    "quill": "a pen made from a feather",
    "riddle": "a question that is a puzzle",
    "saddle": "a seat for riding a horse",
    "tunnel": "a passage under the ground",
    "voyage": "a long journey by sea or in space",
    "whisper": "to speak very softly",
    "banquet": "a large formal meal",
    "cascade": "a small waterfall",
    "drizzle": "light rain",
    "echo": "a sound that comes back",
    "fable": "a short story with a moral",
    "gadget": "a small useful device",
    "haven": "a safe place",
    "inkwell": "a pot that holds ink",
    "jest": "a joke",
    "knack": "a special skill",
    "lagoon": "a lake separated from the sea",
    "mosaic": "a picture made of small pieces",
    "nomad": "a person who moves from place to place",
    "outpost": "a small distant settlement",
    "parcel": "a wrapped package",
    "quiver": "to shake slightly",
    "rumble": "a deep rolling sound",
    "sapling": "a young tree",
    "tremor": "a small shaking movement",
}
WORDS = list(DEFINITIONS)
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy", "clear"]

HELD_OUT_SHARE = 0.15
TOOL_SPLIT_SEED = 99
FORCED_HELD_OUT_CITIES = ["Lisbon"]
FORCED_HELD_OUT_WORDS = ["serene"]


@dataclass(frozen=True)
class ToolSplit:
    held_cities: frozenset[str]
    held_words: frozenset[str]

    def cities(self, held: bool) -> list[str]:
        return [c for c in CITIES if (c in self.held_cities) == held]

    def words(self, held: bool) -> list[str]:
        return [w for w in WORDS if (w in self.held_words) == held]


def _unquoted_words() -> list[str]:
    """Words that no definition uses (a held-out word must not turn up in a trained one)."""
    text = " ".join(DEFINITIONS.values())
    return [w for w in WORDS if not re.search(rf"\b{w}\b", text)]


def make_tool_split(seed: int = TOOL_SPLIT_SEED) -> ToolSplit:
    rng = random.Random(seed)
    cities = held_out(rng, CITIES, HELD_OUT_SHARE, FORCED_HELD_OUT_CITIES)
    # the share is of all the words, drawn from the unquoted ones
    words = held_out(rng, _unquoted_words(), HELD_OUT_SHARE, FORCED_HELD_OUT_WORDS, of=len(WORDS))
    return ToolSplit(cities, words)


# ---------------------------------------------------------------- questions and results

WEATHER_PHRASES = [
    "What's the weather in {c}?",
    "What is the weather like in {c}?",
    "How is the weather in {c}?",
    "Is it raining in {c}?",
    "Weather in {c}?",
    "How warm is it in {c}?",
    "What's the temperature in {c}?",
    "Check the weather in {c}.",
    "Tell me the weather in {c}.",
]
WEATHER_TWO_PHRASES = [
    "What's the weather in {c} and {d}?",
    "Compare the weather in {c} and {d}.",
    "How is the weather in {c} and in {d}?",
]
LOOKUP_PHRASES = [
    "What does {w} mean?",
    "Define {w}.",
    "What is the meaning of {w}?",
    "Look up {w}.",
    "What does the word '{w}' mean?",
    "Look up the word {w}.",
    "Meaning of {w}?",
]
BIG_ADD_PHRASES = [
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "{a} + {b}?",
]
USE_ADD_PHRASES = [
    "Use the add tool: {a} + {b}.",
    "Use the add tool to add {a} and {b}.",
    "Call add with {a} and {b}.",
]


def weather_result(rng: random.Random, city: str) -> tuple[str, list[str], str]:
    """(tool output text, what the answer must contain, the answer)."""
    t, cond = rng.randint(-15, 38), rng.choice(CONDITIONS)
    style = rng.random()
    if style < 0.6:
        out = json.dumps({"city": city, "temperature_c": t, "condition": cond})
    elif style < 0.85:
        out = json.dumps({"temperature": t, "unit": "C", "condition": cond})
    else:
        out = f"{cond}, {t} °C"
    return out, [cond, f"{t} °C"], f"{city}: {cond}, {t} °C"


def _tool_error(rng: random.Random) -> str:
    return json.dumps({"error": rng.choice(["not found", "service unavailable", "timeout"])})


def weather_turn(rng: random.Random, names: list[str], cities: list[str]) -> Turn:
    two = rng.random() < 0.12
    picked = rng.sample(cities, 2 if two else 1)
    if two:
        q = rng.choice(WEATHER_TWO_PHRASES).format(c=picked[0], d=picked[1])
    else:
        q = rng.choice(WEATHER_PHRASES).format(c=picked[0])
    q = case(rng, q)
    where = " and ".join(picked)
    if "get_weather" not in names:
        answer = "I cannot check the weather: I have no weather tool here."
        return Turn(q, answer, "I have no weather tool.\n", "no_tool", expect=[answer])
    calls = [("get_weather", {"city": c}) for c in picked]
    if not two and rng.random() < 0.05:
        err = _tool_error(rng)
        reason = json.loads(err)["error"]
        answer = f"The weather tool failed for {picked[0]}: {reason}."
        return Turn(q, answer, f"The user wants the weather in {where}.\n", "weather_error",
                    calls, [err], expect=[reason])  # fmt: skip
    results, expect, parts = [], [], []
    for c in picked:
        out, must, text = weather_result(rng, c)
        results.append(out)
        expect += must
        parts.append(text)
    answer = "; ".join(parts) + "."
    reasoning = f"The user wants the weather in {where}: I call get_weather.\n"
    return Turn(q, answer, reasoning, "weather", calls, results, expect)


def lookup_turn(
    rng: random.Random,
    names: list[str],
    words: list[str],
    definitions: dict[str, str] | None = None,
) -> Turn:
    """`definitions`: the meanings of words DEFINITIONS lacks (made-up ones, see made_up)."""
    w = rng.choice(words)
    q = case(rng, rng.choice(LOOKUP_PHRASES).format(w=w))
    if "lookup" not in names:
        answer = f"I do not know what {w} means, and I have no lookup tool here."
        return Turn(q, answer, "I have no lookup tool.\n", "no_tool", expect=[answer])
    d = DEFINITIONS.get(w) or (definitions or {})[w]
    if rng.random() < 0.04:
        err = _tool_error(rng)
        reason = json.loads(err)["error"]
        answer = f"The lookup tool failed for {w}: {reason}."
        return Turn(q, answer, f"The user asks what {w} means.\n", "lookup_error",
                    [("lookup", {"word": w})], [err], expect=[reason])  # fmt: skip
    out = json.dumps({"word": w, "definition": d}) if rng.random() < 0.7 else d
    answer = f"{w}: {d}."
    reasoning = f"The user asks what {w} means: I call lookup.\n"
    return Turn(q, answer, reasoning, "lookup", [("lookup", {"word": w})], [out], [d])


# ---------------------------------------------------------------- made-up names

_ONSETS = "b c d f g h k l m n p r s t v w z br dr gr kr pl st tr ch sh th".split()
_VOWELS = "a e i o u a e o ia ou".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "k", "m", "rt", "nd", "st"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# English letter frequencies (%), a..z
_LETTER_WEIGHTS = [8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4, 6.7,
                   7.5, 1.9, 0.095, 6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074]  # fmt: skip
# what a made-up name or a run of random letters must not be
_KNOWN = frozenset(w.lower() for w in CITIES + WORDS)


def made_up(rng: random.Random, capital: bool) -> str:
    """A pronounceable made-up name (2 or 3 syllables) that is no city or word of the demo's.

    Training questions about made-up cities and words teach the model to copy the name from
    the question into the call, whatever its tokens, instead of recalling names it has seen;
    the held-out cities and words are then copied like any other."""
    while True:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))]
        name = "".join(parts) + rng.choice(_CODAS)
        if name not in _KNOWN and 4 <= len(name) <= 10:
            return name.capitalize() if capital else name


def letters(rng: random.Random) -> str:
    """3 to 9 random letters (English letter frequencies) that are no city or word of the
    demo's: no syllable pattern, so the tokenizer splits them into its rarest, mostly single
    letter pieces, as it splits a held-out name ("L j ub l j an a"). The copying drills'
    hardest pieces: a copy that slips one letter fails."""
    while True:
        text = "".join(rng.choices(_LETTERS, _LETTER_WEIGHTS, k=rng.randint(3, 9)))
        if text not in _KNOWN:
            return text


# Everyday English words for the copying drills (echo texts, made-up meanings). A held-out
# definition is real words in an order the model has never seen, and its misses were real
# words bent toward familiar ones ("fit together" -> "fit to do", "to shake" -> "to shared"):
# drills of real words in random orders teach copying over the model's own expectations.
# TurnSampler leaves out every word of a held-out meaning, word or city (everyday_words).
EVERYDAY = """
able about above across act after again age air all almost alone along also always among
angry animal answer any apple area arm army around art ask away baby back bad bag ball
band bank base basket bath bear beautiful bed bee before begin behind bell below belt
best better between big bird birth bit bite black blade blanket blind blood blow blue
board boat body bone bottle bottom box boy brain brake branch brass bread breath brick
bridge bright broken brother brown brush bucket bulb burn busy butter button cake camera
card care carpet cart cat cause chain chalk chance change cheap cheese chest chief child
chin church circle clean clear clock cloth cloud coal coat cold collar colour comb come
common copper copy cord cork cotton cough country cow crack credit crime cruel crush cry
cup current curtain curve cushion damage danger dark dear death debt deep degree desk
detail dog door doubt down drain drawer dress drink drop dry dust ear early earth east
edge egg engine enough equal even event every exact example expert eye face fact fall
false family far farm fat father fear feather feeling female fever few field fight
finger fire first fish flag flame flat floor flower fly fold food foolish foot force fork
form forward frame free friend front full future garden general gift girl glass glove
goat gold good grain grass great green grey grip group growth guide gun hair hammer hand
happy harbour hard hat hate head healthy hearing heart help high history hole hook hope
horn horse hospital hour house humour idea important iron island jelly jewel journey
judge jump kettle key kick kind kiss knee knife knot language last late laugh law lead
leaf learning leather left leg letter level library lift like limit line linen lip
liquid list living lock long loose loss loud love low machine male man manager map mark
market married mass match meal measure meat medical meeting memory metal middle milk
mind mine minute mist mixed money monkey month moon morning mother motion mountain mouth
move music nail name narrow nation natural near necessary neck needle nerve net new news
night noise normal north nose number nut offer office oil old open opinion orange organ
oven owner page pain paint paper parcel park part past paste payment pen pencil person
physical picture pig pin pipe plane plant plate play pleasure plough pocket point poison
polish poor porter position powder power present price print prison private process
produce profit property public pull pump punishment purpose push quality question quick
quiet range rate ray reading ready reason receipt record red regular religion request
respect rest reward rhythm rice right ring river road rod roll roof room root rule run
sad safe sail salt same scale school science scissors screw sea seat second secret seed
self sense servant sex sharp sheep shelf shirt shock shoe short side sign silk silver
simple sister size skin skirt sky sleep slip slope slow small smash smell smile smoke
smooth snake sneeze snow soap society sock soft solid song sort sound soup south space
spade special sponge spoon spring square stage stamp star start statement station steam
steel stem step stick sticky stiff still stitch stomach stone stop store story straight
strange street stretch strong structure sugar summer sun support surprise sweet swim
system table tail talk tall taste tax teaching tendency test theory thick thin thing
thought thread throat thumb thunder ticket tight till time tin tired toe tongue tooth top
touch town trade train transport tray trick trouble trousers turn twist unit use value
verse vessel view voice waiting walk wall war warm wash waste watch water wave wax week
weight well west wet wheel whip whistle white wide window wine wing winter wire wise
woman wood wool word work worm wound writing wrong year yellow young
""".split()


def banned_words(avoid: set[str]) -> set[str]:
    """Every word of the `avoid` texts (held-out meanings, words, cities), lower case."""
    return {w.strip(",;.").lower() for text in avoid for w in text.split()}


def everyday_words(avoid: set[str]) -> list[str]:
    """EVERYDAY less every word of the `avoid` texts (held-out meanings, words, cities)."""
    banned = banned_words(avoid)
    return [w for w in EVERYDAY if w not in banned]


def spliced(rng: random.Random, words: Sequence[str], banned: set[str]) -> str:
    """An unseen word spliced from known ones: the start of one of `words` and the end of
    another (4 to 10 letters; no word of the demo's and none of `banned`). The tokenizer
    splits it into common pieces in an order no training text has, which is how it splits a
    held-out definition's words ("together": " to" "get" "her"); the copies the demo gets wrong
    slip exactly there (" to" "ac" "her"). Made-up names and random letters are rarer pieces."""
    long = [w for w in words if len(w) >= 3 and w.isalpha()]
    while True:
        a, b = rng.sample(long, 2)
        word = (a[: rng.randint(1, len(a) - 1)] + b[rng.randint(1, len(b) - 1) :]).lower()
        if 4 <= len(word) <= 10 and word not in _KNOWN and word not in banned and word not in words:
            return word


def spliced_text(
    rng: random.Random, words: Sequence[str], banned: set[str], avoid: set[str]
) -> str:
    """2 to 7 words, half of them spliced (the rest `words`), containing none of `avoid`:
    a text to repeat back (the echo task) or a made-up word's meaning."""
    while True:
        n = rng.randint(2, 7)
        text = " ".join(
            spliced(rng, words, banned) if rng.random() < 0.5 else rng.choice(words)
            for _ in range(n)
        )
        if not any(a in text for a in avoid):
            return text


def vocab_pieces(tok: Any) -> list[str]:
    """The tokenizer's lower-case word pieces of 2 or more letters, without their leading
    space: what token_text builds its words from. Each stands for a token, rare ones too."""
    pieces = {tok.decode([i]).strip() for i in range(tok.get_vocab_size())}
    return sorted(p for p in pieces if len(p) >= 2 and p.isascii() and p.isalpha() and p.islower())


def token_text(rng: random.Random, pieces: Sequence[str], banned: set[str], avoid: set[str]) -> str:
    """2 to 6 words of 1 to 3 `pieces` (vocab_pieces) each, none of `banned` and containing
    none of `avoid`. Every word piece of the vocabulary, drawn alike: the copies the demo
    gets wrong slip at pieces the training texts hardly have ("ob" "ject" came out "ob"
    "ust"), and a text of them has no order the model could expect instead."""
    while True:
        words = [
            "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(2, 6))
        ]
        text = " ".join(words)
        if not banned.intersection(words) and not any(a in text for a in avoid):
            return text


# The short words phrase_text() draws about half its words from (those of them the training
# definitions use): a held-out definition's copies slip at them ("a lamp with a protective
# case" came out "a lamp with protective case", "neat and in order" as "neat and order"),
# and the other drills have few (token_text and spliced words, none).
FUNCTION_WORDS = "a an the of in on at to for with from by or and not that which who is".split()


def phrase_text(
    rng: random.Random, function_words: Sequence[str], words: Sequence[str], avoid: set[str]
) -> str:
    """3 to 9 words, each one of `function_words` (FUNCTION_WORDS) half of the time and one
    of `words` otherwise, in random order, containing none of `avoid` (the held-out
    meanings): short words repeated and in places no phrase puts them ("not table by a a"),
    which an answer can only get right by copying."""
    while True:
        text = " ".join(
            rng.choice(function_words) if rng.random() < 0.5 else rng.choice(words)
            for _ in range(rng.randint(3, 9))
        )
        if not any(a in text for a in avoid):
            return text


# The marks punctuate() puts into the drills' texts: held-out definitions have them ("calm,
# peaceful and untroubled", "not proud; modest") and no other drill text had one, so copies
# stopped or slipped there ("humble: not proud.").
PUNCTUATION = [",", ";"]


def punctuate(rng: random.Random, text: str, avoid: set[str]) -> str:
    """`text` with a comma or semicolon after one or two of its words (never the last), or
    `text` itself where that would contain one of `avoid` (the held-out meanings)."""
    words = text.split()
    if len(words) < 2:
        return text
    for i in rng.sample(range(len(words) - 1), min(rng.randint(1, 2), len(words) - 1)):
        words[i] += rng.choice(PUNCTUATION)
    marked = " ".join(words)
    return text if any(a in marked for a in avoid) else marked


def made_up_meaning(
    rng: random.Random, words: list[str], avoid: set[str], everyday: Sequence[str] = ()
) -> str:
    """A made-up definition: 3 to 7 words in a row, each one of `words` (the training
    definitions' words), a third of the time a made-up one (unfamiliar pieces, as a held-out
    definition's rarer words are; one in four of those random letters) and, given
    `everyday` (everyday_words), a sixth of the time an everyday word; containing none of
    `avoid` (the held-out meanings). An answer can only quote it by copying it from the
    tool's result, which is the skill a held-out word needs."""

    def piece() -> str:
        r = rng.random()
        if r < 1 / 12:
            return letters(rng)
        if r < 1 / 3:
            return made_up(rng, False)
        return rng.choice(everyday) if everyday and r < 1 / 2 else rng.choice(words)

    while True:
        text = " ".join(piece() for _ in range(rng.randint(3, 7)))
        if not any(a in text for a in avoid):
            return text


def echo_text(
    rng: random.Random,
    cities: list[str],
    words: list[str],
    avoid: set[str],
    everyday: Sequence[str] = (),
) -> str:
    """1 to 8 pieces to repeat back (data.echo_turn): made-up words and names, random
    letters, `words` (the training definitions' words) and, given them, `everyday` words
    (everyday_words), `cities` (the training side) and numbers of 1 to 7 digits, the kinds
    of text a call or an answer copies; containing none of `avoid` (the held-out meanings)."""
    while True:
        pieces = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.25:
                pieces.append(made_up(rng, rng.random() < 0.3))
            elif r < 0.35:
                pieces.append(letters(rng))
            elif r < 0.65:
                pool = everyday if everyday and r < 0.5 else words
                pieces.append(rng.choice(pool))
            elif r < 0.8:
                pieces.append(rng.choice(cities))
            else:
                pieces.append(str(rng.randint(0, 10 ** rng.randint(1, 7) - 1)))
        text = " ".join(pieces)
        if not any(a in text for a in avoid):
            return text


def _big_number(rng: random.Random) -> int:
    return rng.randint(10 ** (d := rng.randint(3, 6)), 10 ** (d + 1) - 1)


def add_tool_turn(rng: random.Random, names: list[str]) -> Turn:
    """Big numbers (4 to 7 digits), or a user who asks for the tool by name (3-digit numbers:
    never a held-out 2-digit pair)."""
    if rng.random() < 0.25:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        q = rng.choice(USE_ADD_PHRASES).format(a=a, b=b)
    else:
        a, b = _big_number(rng), rng.choice([_big_number(rng), rng.randint(1, 999)])
        if rng.random() < 0.5:
            a, b = b, a
        q = rng.choice(BIG_ADD_PHRASES).format(a=a, b=b)
    q = case(rng, q)
    if "add" not in names:
        answer = "That is too big for me: I add numbers up to three digits, or use an add tool."
        return Turn(q, answer, "The numbers are too big and I have no add tool.\n", "no_tool",
                    expect=[answer])  # fmt: skip
    s = a + b
    out = json.dumps({"result": s}) if rng.random() < 0.6 else str(s)
    reasoning = f"I call add for {a} + {b}.\n"
    return Turn(q, add_answer(a, b), reasoning, "add_tool", [("add", {"a": a, "b": b})], [out],
                [str(s)])  # fmt: skip


def tools_subset(rng: random.Random, focus: bool = False) -> list[dict[str, Any]] | None:
    """The tools a conversation declares: None (no tools) or a shuffled non-empty subset.
    focus (tool-focused rows): never None, and one or two tools 60% of the time, so that
    a short list that names the tool is met with a call as often as a full one."""
    r = rng.random()
    if r < 0.45 and not focus:
        return None
    if r < (0.4 if focus else 0.75):
        chosen = list(TOOLS)
    else:
        chosen = rng.sample(TOOLS, rng.randint(1, 2))
    rng.shuffle(chosen)
    return chosen
