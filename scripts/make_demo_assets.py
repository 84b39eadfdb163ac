#!/usr/bin/env python
"""Generate the offline demo assets shipped in ``trainer/assets``.

Writes, deterministically (fixed seed, no hashing of sets, no wall-clock input):

* ``demo/{train,validation,test}.txt`` -- a synthetic CoNLL-2003-style NER sample (``word POS chunk NER``,
  IOB2 tags, types PER/LOC/ORG/MISC, ``-DOCSTART-`` document separators). All sentences come from the
  templates and made-up or generic name lists below; no corpus text is copied. Validation and test draw part
  of their names from pools that the training split never uses, so scores are not trivially perfect. Every
  split holds a few long sentences (90-160 words) to exercise sliding-window code.
* ``demo-tokenizer/`` -- a small XLM-R-style fast tokenizer (Unigram + Metaspace, NFKC, ~4k pieces) trained
  with the ``tokenizers`` library on those files, with XLM-R's special ids (``<s>``=0, ``<pad>``=1, ``</s>``=2,
  ``<unk>``=3, ``<mask>`` last). It loads with ``transformers.AutoTokenizer.from_pretrained(dir)`` without
  sentencepiece.

Usage: ``python scripts/make_demo_assets.py [--out-dir DIR]`` (default: ``trainer/assets`` of this checkout).
Running it twice gives byte-identical files (``tests/test_demo_assets.py`` checks this against the committed
copies).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

SEED = 20240601
SPLIT_SIZES = {"train": 1200, "validation": 250, "test": 250}
LONG_PER_SPLIT = {"train": 5, "validation": 4, "test": 4}
VOCAB_SIZE = 4000
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in XLM-R; "<mask>" is appended last
MASK_TOKEN = "<mask>"
SEED_MARK = "¶"  # never in the data; see build_tokenizer_json
CHAR_MARK = "¤"  # never in the data; see build_tokenizer_json
SCORE_DECIMALS = 5  # Unigram log-probabilities are rounded to this many decimals (see build_tokenizer_json)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "trainer" / "assets"


def _names(text: str) -> list[str]:
    """A name list written as ``a | b | c`` over several lines (one name may hold several words)."""
    return [name.strip() for name in text.replace("\n", " ").split("|") if name.strip()]


# --------------------------------------------------------------------------------------------------------------
# Name pools: generic given names, made-up or common surnames, real place names (facts, not text) and made-up
# places, made-up companies, clubs and events. Each pool is split (deterministically) into a part every split
# may use and two parts reserved for validation and test only.
# --------------------------------------------------------------------------------------------------------------

FIRST_NAMES = _names(
    """
    John | Maria | José | Anna | Peter | Elena | Tomás | Ingrid | Mehmet | Aiko | Lars | Sofia | Pierre |
    Björn | Wei | Fatima | Raúl | Olga | David | Nadia | Kofi | Yuki | Marek | Zoë | Hans | Lucía | Ahmed |
    Greta | Paolo | Ilse | Dmitri | Amara | Jan | Eva | Rafael | Leila | Mikael | Noor | Stefan | Carmen |
    Oskar | Hana | Tariq | Mirela | Viktor | Agnès | Samuel | Irene | Jürgen | Thandiwe | Kenji |
    Małgorzata | Andrés | Siobhan | Priya | Emeka | Astrid | François | Gustavo | Henrik | Isabel |
    Joaquín | Katarzyna | Luca | Magnus | Nikolai | Orla | Pablo | Rania | Sven | Teodora | Ugo |
    Valentina | Wojciech | Ximena | Yusuf | Zainab | Chloé | Søren | Ayşe | Michael | Laura | Daniel |
    Sarah | Thomas | Julia
    """
)

LAST_NAMES = _names(
    """
    Varnek | Holloway | Brandt | Okafor | Lindqvist | Moreau | Castillo | Nakamura | Kowalczyk | Duarte |
    Ferreira | Østergaard | Müller | Novak | Petrescu | Haddad | Ivanova | Whitcombe | Albescu | Marchetti |
    Oyelaran | Sandoval | Tanaka | Quist | Rasmussen | Schäfer | Dvořák | Kaczmarek | Mensah | Ngata |
    Olsen | Papadakis | Reyes | Sørensen | Tremblay | Ueda | Vasquez | Wainwright | Yilmaz | Zielinski |
    Achterberg | Bellamy | Cardoso | Delacroix | Eriksen | Fontaine | Gallardo | Hoffmann | Iturbe |
    Jovanović | Kerrigan | Lafleur | Mbeki | Nieminen | O'Rourke | McAllister | Pereira | Quintero | Rossi |
    Szabó | Thorsen | Urquhart | Valdés | Weiß | Xavier | Yamada | Zamora | Abernathy | Brennan | Chaudhry |
    Dimitrov | Eklund | Farouk | Gonçalves | Halvorsen | Ibáñez | Jansen | Kovač | Lemaire | Moretti | Nwosu
    """
)

# Multi-word surnames with lowercase particles ("Jan van der Berg" is B-PER I-PER I-PER I-PER).
PARTICLE_LAST_NAMES = _names(
    """
    van der Berg | de la Cruz | dos Santos | von Altdorf | da Silva | van Houten | de Vries | le Brun |
    di Matteo | al-Rashid | ter Horst | del Río
    """
)

CITIES = _names(
    """
    London | Paris | Zürich | Łódź | São Paulo | Berlin | Madrid | Tokyo | Nairobi | Lagos | Kraków |
    Göteborg | Reykjavík | Montréal | Bogotá | Lima | Cairo | Sydney | Oslo | Vienna | Prague | Lisbon |
    Athens | Istanbul | Seoul | Mumbai | Toronto | Chicago | Boston | New York | Los Angeles |
    Rio de Janeiro | Buenos Aires | Cape Town | Kuala Lumpur | Hong Kong | Tel Aviv | Málaga | Brno |
    Tromsø | Düsseldorf | Genève | Dunmere | Valtessa | Korvik | Brennisford | Santa Olaya | Port Harlow |
    Kestrel Bay | Marrowby | Ostberg | Villanueva del Mar | Třebíč | Håkonvik | Aldermoor | San Teodoro |
    Gdańsk | Córdoba | Milan | Munich | Hamburg | Lyon | Marseille | Porto | Seville | Antwerp | Rotterdam |
    Dublin | Glasgow | Helsinki | Warsaw
    """
)

COUNTRIES = _names(
    """
    France | Germany | Brazil | Japan | Kenya | Poland | Switzerland | Canada | Peru | Egypt | Norway |
    Italy | Spain | Turkey | India | Chile | Mexico | Ghana | Sweden | Portugal | United States |
    South Africa | New Zealand | Czech Republic | Côte d'Ivoire | Iceland | Vietnam | Argentina | Colombia |
    Nigeria | Denmark | Finland | Austria | Greece | Romania | Hungary | Ireland | Scotland | Belgium |
    Netherlands | Morocco | Australia | South Korea | Malaysia | Uruguay | Croatia | Serbia | Ukraine
    """
)

REGIONS = _names(
    """
    Europe | Asia | Africa | Latin America | the Middle East | Scandinavia | the Balkans | North America |
    the Pacific | Central Asia
    """
)

COMPANIES = _names(
    """
    Norvex Holdings | Bluefield Corp | Altamira Foods | Kestrel Airways | Greyline Systems | Orsolo Bank |
    Helix Mining | Tarrant Motors | Vanteo | Quillon Pharma | Brightwater Energy | Solvane AG |
    Mercado Unido | Nordlys ASA | Pacifica Telecom | Ironbridge Capital | Zephyr Logistics | Calder & Rowe |
    Lumen Textiles | Ostara Steel | Crestmoor Insurance | Açaí Brasil SA | Fjällström Group |
    Dragoș Industries | eNova | Merrow Chemicals | Halvard Shipping | Corvane Inc | Treadwell Retail |
    Sunspire Solar | Banco Portuario | Koyama Electric | Rheinfeld Versicherung | Pemberton Foods |
    Atlas Cement | Verdant Paper | Marlowe Brewing | Nexora | Polaris Rail | Castellan Media |
    Ambergate Mills | Société Ferrand | Kowloon Harbour Ltd | Tidewater Oil
    """
)

ORGANISATIONS = _names(
    """
    United Nations | European Union | World Bank | Red Cross | Central Statistics Office |
    Ministry of Finance | Football Association | Supreme Court | Federal Reserve | UN | EU | IMF | NATO |
    OPEC | Interior Ministry | Green Alliance | Harbour Authority | National Assembly | Workers Party |
    Liberal Democrats | Central Bank | Senate | Parliament | ICTA | NRB | International Rowing Federation |
    Council of Ministers | Union of Dockworkers | Reuters | Olympic Committee | Foreign Ministry |
    Securities Commission | Agrarian Party | Medical Council | Civic Forum | Coast Guard |
    University of Valtessa | Academy of Sciences | Farmers Union
    """
)

CLUBS = _names(
    """
    Dunmere United | Real Valtessa | Korvik FC | Athletic Brennisford | Olympique Lumière | Dynamo Korvik |
    Port Harlow Rovers | Sporting Ostberg | Marrowby Town | Aldermoor City | Inter Santa Olaya |
    Kestrel Bay Wanderers | FC Håkonvik | União São Teodoro | Lokomotiv Brno | Zürich Rovers |
    Łódź Athletic | Ajax Rotterdam | Celtic Glasgow | Dublin Harps | Lyon Olympic | Porto Academica |
    Hamburg Hafen | Munich Eagles | Genève Servette | Lisbon Marítimo | Seville Giralda | Antwerp Royal |
    Helsinki JK | Warsaw Legion | Milan Navigli | Athens Aris
    """
)

NATIONALITIES = _names(
    """
    German | French | Brazilian | Japanese | Polish | Swiss | Kenyan | Canadian | Peruvian | Egyptian |
    Norwegian | Italian | Spanish | Turkish | Indian | Chilean | Mexican | Ghanaian | Swedish | Portuguese |
    American | European | Asian | Icelandic | Danish | Finnish | Austrian | Greek | Romanian | Hungarian |
    Irish | Scottish | Belgian | Dutch | Moroccan | Australian | Argentine | Colombian | Nigerian |
    Croatian | Serbian | Ukrainian | Czech | Vietnamese | Arab | Muslim | Catholic | Basque | Kurdish |
    Québécois
    """
)

EVENTS = _names(
    """
    World Cup | Olympic Games | Grand Prix | Davis Cup | Tour de France | Valtessa Open | Northern Cup |
    Winter Classic | Golden Ring Trophy | European Championship | Super Bowl | Nobel Prize | Euro 96 |
    Commonwealth Games | Korvik Marathon | Dunmere Regatta | Copa del Sol | Masters | Champions League |
    Cup Winners Cup | Ostberg Classic | Rally Łódź | Giro di Marrowby | Pan-Asian Games | Atlantic Series |
    Brennisford Festival
    """
)

PRODUCTS = _names(
    """
    Windows | Boeing 747 | Airbus A320 | Nexora X2 | Sunspire 500 | Corvane Reader | Euroline |
    Tarrant Comet | Helix-9 | Galaxy Lite
    """
)

POOLS: dict[str, list[str]] = {
    "first": FIRST_NAMES,
    "last": LAST_NAMES,
    "particle": PARTICLE_LAST_NAMES,
    "city": CITIES,
    "country": COUNTRIES,
    "region": REGIONS,
    "company": COMPANIES,
    "org": ORGANISATIONS,
    "club": CLUBS,
    "nat": NATIONALITIES,
    "event": EVENTS,
    "product": PRODUCTS,
}

# --------------------------------------------------------------------------------------------------------------
# Part-of-speech lexicon for the template words (lowercased lookup; unknown words default to NN).
# --------------------------------------------------------------------------------------------------------------

_POS_WORDS = {
    "DT": "the a an this that these those some all no each every another both",
    "IN": (
        "of in on at for with from by to into after before during against over under about near between "
        "than since despite without while as per like until across behind outside"
    ),
    "CC": "and or but &",
    "TO": "",
    "PRP": "it he she they we i you them him her us",
    "PRP$": "its his their our my",
    "MD": "would will could should may might must can",
    "RB": (
        "not also later earlier again only still already never almost up down sharply slightly nearly "
        "late early abroad home here there n't very just once twice away too however"
    ),
    "WDT": "which that",
    "WP": "who",
    "EX": "",
    "VBD": (
        "said told visited rose fell closed met signed won beat scored arrived announced reported lost drew "
        "agreed rejected denied confirmed added was were opened ended finished took led called warned named "
        "resigned joined left returned gained dropped slipped climbed edged held became sold bought bid "
        "elected injured hit praised appointed expected declined shot struck"
    ),
    "VBZ": "is has says plans expects does",
    "VBP": "are have say",
    "VB": "buy cut join meet sell be ask help play face raise leave hold return visit open win make keep travel go",
    "VBN": (
        "been charged postponed approved expected arrested killed injured played held delayed appointed "
        "named called given seen cancelled suspended"
    ),
    "VBG": "leading following trading including playing seeking talking according",
    "JJ": (
        "new higher lower quiet little immediate early final next last first second third former senior "
        "foreign domestic national local net annual quarterly big small strong weak heavy light major "
        "minor private public chief own further main open top key unchanged high low good bad long short "
        "several other few many more less best worst"
    ),
    "NNS": (
        "shares profits jobs people officials delegates dealers prices talks reporters results points "
        "sales exports imports workers clashes police goals matches teams standings players fans "
        "troops votes seats investors analysts rates bonds markets years months weeks days minutes "
        "percent tonnes kilometres metres miles votes games sets rounds years-old accounts holders"
    ),
    "CD": "one two three four five six seven eight nine ten eleven twelve hundred thousand million billion",
    "POS": "'s '",
    ",": ",",
    ".": ".",
    ":": ": ; - -- ...",
    "(": "(",
    ")": ")",
    '"': '"',
    "$": "$ £ €",
}

LEXICON: dict[str, str] = {}
for _tag, _words in _POS_WORDS.items():
    for _w in _words.split():
        LEXICON.setdefault(_w, _tag)
LEXICON["to"] = "TO"
LEXICON["there"] = "EX"

NP_TAGS = {"NNP", "NNPS", "NN", "NNS", "CD", "DT", "JJ", "PRP", "PRP$", "POS", "$"}
VP_TAGS = {"VB", "VBD", "VBZ", "VBP", "VBN", "VBG", "MD", "TO"}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = _names(
    """
    January | February | March | April | May | June | July | August | September | October | November |
    December
    """
)
SPORTS = ["SOCCER", "TENNIS", "CRICKET", "RUGBY", "ATHLETICS", "CYCLING", "GOLF", "BASKETBALL", "ROWING"]

# --------------------------------------------------------------------------------------------------------------
# Templates. Whitespace-separated tokens; ``{SLOT}`` tokens expand to one or more words. Entity slots: PER
# (full name), PERL (surname only), CITY, COUNTRY, LOC (city or country), REGION, COMP, ORG (company or other
# organisation), GOV (non-company organisation), CLUB, NAT, EVENT, PRODUCT, MISC (nationality or event).
# Non-entity slots: NUM, SMALL, SCORE (one digit), SCORELINE (3-1), PCT, MONEY, DAY, MONTH, YEAR, DATE, TIME,
# AGE, SPORT. A template starting with "^" is written in capitals (a headline).
# --------------------------------------------------------------------------------------------------------------

TEMPLATES: list[tuple[int, str]] = [
    (6, "{PER} , chairman of {COMP} , said on {DAY} that the company would cut {NUM} jobs ."),
    (5, "{PER} , chief executive of {COMP} , told reporters in {CITY} that profits rose {PCT} percent ."),
    (5, "{PER} visited {LOC} on {DAY} ."),
    (4, "{PER} visited {CITY} , {COUNTRY} , last week to meet {PER} of the {GOV} ."),
    (4, "The {NAT} government said it would ask the {GOV} for help ."),
    (5, "{NAT} striker {PER} scored twice as {CLUB} beat {CLUB} {SCORELINE} in {CITY} on {DAY} ."),
    (5, "Shares in {COMP} fell {PCT} percent to {MONEY} in early trading on {DAY} ."),
    (3, "There was no immediate comment from the ministry ."),
    (3, "The market closed higher on {DAY} after a quiet session ."),
    (2, "prices were little changed , dealers said ."),
    (2, "trading was thin ahead of the holiday weekend ."),
    (4, "{COUNTRY} and {COUNTRY} signed a trade agreement in {CITY} on {DAY} ."),
    (4, "{PER} ( {COUNTRY} ) {TIME} , {PER} ( {COUNTRY} ) {TIME} , {PER} ( {COUNTRY} ) {TIME}"),
    (3, "{SMALL} . {PER} ( {COUNTRY} ) {TIME}"),
    (4, "{PER} of {COUNTRY} won the {EVENT} title on {DAY} ."),
    (3, "{COMP} to sell {NAT} unit to {COMP} for {MONEY} ."),
    (3, "{NAT} {PER} beat {NAT} {PER} {SCORELINE} {SCORELINE} in the {EVENT} final ."),
    (2, "Pairs : {PERL} {PERL} beat {PERL} {PERL} {SCORELINE} {SCORELINE} ."),
    (3, "{GOV} officials met {NAT} and {NAT} delegates in {CITY} ."),
    (3, "Police in {CITY} arrested {NUM} people after clashes near the {GOV} headquarters ."),
    (3, "{PER} told the {GOV} that {COUNTRY} would not join the {EVENT} ."),
    (3, "{COUNTRY} 's {GOV} leader {PER} said the talks would continue ."),
    (3, "{COUNTRY} coach {PER} named {SMALL} players for the match against {COUNTRY} ."),
    (2, "{PERL} said ."),
    (3, "The deal was approved by the {GOV}"),
    (3, "The winner was {PER}"),
    (3, "He will travel to {LOC} next week to meet {PER}"),
    (4, "{COMP} said on {DAY} its net profit rose to {MONEY} from {MONEY} a year earlier ."),
    (3, "the {NAT} team arrived in {CITY} late on {DAY} ."),
    (3, "{COMP} said exports rose to {MONEY} in {MONTH} , up {PCT} percent from {MONTH} {YEAR} ."),
    (4, '" We are very happy with the result , " said {PER} , the {CLUB} coach .'),
    (3, "{PER} , {AGE} , of {CITY} , was charged with fraud on {DAY} ."),
    (3, "In {CITY} , shares of {COMP} rose {PCT} points to {NUM} ."),
    (2, "Weather : rain in {CITY} , sun in {CITY} and {CITY} ."),
    (3, "Teams : {CLUB} , {CLUB} , {CLUB} and {CLUB} ."),
    (2, "-- {CITY} Newsroom , +{SMALL} {NUM} {NUM}"),
    (3, "{CITY} {DATE}"),
    (3, "^{SPORT} - {CLUB} BEAT {CLUB} IN {EVENT} ."),
    (3, "^{SPORT} - {NAT} {PERL} WINS {EVENT} ."),
    (2, "^{COMP} SHARES FALL ON PROFIT WARNING ."),
    (2, "^{COUNTRY} , {COUNTRY} AGREE ON BORDER TALKS ."),
    (3, "{CLUB} {SCORE} {CLUB} {SCORE}"),
    (2, "{COUNTRY} {SCORE} {COUNTRY} {SCORE}"),
    (2, "{PERL} had been expected to join {CLUB} from {CLUB} for {MONEY} ."),
    (2, "The {PRODUCT} was launched by {COMP} in {REGION} last year ."),
    (2, "{NAT} and {NAT} troops were deployed along the border with {COUNTRY} ."),
    (2, "Analysts expect the {GOV} to raise rates by {PCT} points in {MONTH} ."),
    (2, "{PER} , who joined {COMP} in {YEAR} , will replace {PER} as chairman ."),
    (2, "Investors in {REGION} sold {NAT} bonds after the {GOV} warned of slower growth ."),
    (2, "{ORG} and {ORG} agreed to merge their {REGION} operations ."),
    (2, "He said the {EVENT} in {CITY} would go ahead as planned ."),
    (2, "{PER} ( {CLUB} ) scored in the {SMALL} minute ."),
    (2, "Attendance : {NUM}"),
    (2, "{NAT} Prime Minister {PER} arrived in {COUNTRY} for a {SMALL} -day visit ."),
    (2, "The report could not be independently verified ."),
    (2, "The {EVENT} will be held in {CITY} , {COUNTRY} , from {MONTH} {SMALL} ."),
    (2, "{CITY} -based {COMP} reported a loss of {MONEY} ."),
    (2, "Results of the {EVENT} on {DAY} :"),
    (1, "Standings ( tabulate under played , won , drawn , lost , goals for , against , points ) :"),
    (2, "{CLUB} {SMALL} {SMALL} {SMALL} {SMALL} {NUM} {NUM} {NUM}"),
    (2, "{PER} , {PER} and {PER} were also injured in the crash near {CITY} ."),
    (1, "no one was hurt , police said ."),
    (1, "the index ended {PCT} points higher at {NUM} ."),
    (2, "{GOV} spokesman {PER} declined to comment ."),
    (2, "{COMP} ( {COMP} ) , the {NAT} group , said it was in talks with {COMP} ."),
]

LONG_CONNECTORS = [", and", ", while", ", but", "; meanwhile ,", ", after", ", as", "; separately ,"]

LONG_CLAUSES = [
    "{PER} of {COMP} said the {GOV} would decide on {DAY}",
    "{NAT} officials met {PER} in {CITY}",
    "{CLUB} beat {CLUB} {SCORELINE} in front of {NUM} fans",
    "shares in {COMP} rose {PCT} percent",
    "the {EVENT} in {CITY} drew visitors from {COUNTRY} and {COUNTRY}",
    "{PER} told the {GOV} that {COUNTRY} would back the plan",
    "prices in {REGION} were little changed",
    "{PER} , the {NAT} minister , left {CITY} for {CITY}",
    "the {GOV} said talks with {COMP} would continue",
    "police in {CITY} said {NUM} people were arrested",
]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# A token while building a sentence: (word, POS, entity type or None, starts a new mention).
Token = tuple[str, str, str | None, bool]
Row = tuple[str, str, str, str]  # word POS chunk NER


class SplitSampler:
    """Draws names for one split: from the pool part every split shares, or from the split's reserved part."""

    def __init__(self, rng: random.Random, pools: dict[str, tuple[list[str], list[str]]], unseen_p: float):
        self.rng = rng
        self.pools = pools
        self.unseen_p = unseen_p

    def pick(self, pool: str) -> str:
        shared, own = self.pools[pool]
        if own and self.rng.random() < self.unseen_p:
            return self.rng.choice(own)
        return self.rng.choice(shared)


def _partition_pools(rng: random.Random) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """Per split and pool: (shared names, names only this split uses). Train has no reserved names."""
    by_split: dict[str, dict[str, tuple[list[str], list[str]]]] = {s: {} for s in SPLIT_SIZES}
    for name, items in POOLS.items():
        order = [_nfc(x) for x in items]
        rng.shuffle(order)
        n_res = len(order) * 15 // 100 if len(order) >= 10 else 0
        n_shared = len(order) - 2 * n_res
        shared, val_only, test_only = (
            order[:n_shared],
            order[n_shared : n_shared + n_res],
            order[n_shared + n_res :],
        )
        by_split["train"][name] = (shared, [])
        by_split["validation"][name] = (shared, val_only)
        by_split["test"][name] = (shared, test_only)
    return by_split


def _entity(text: str, etype: str, pos: str = "NNP") -> list[Token]:
    return [(w, "CC" if w == "&" else pos, etype, i == 0) for i, w in enumerate(text.split())]


def _plain(word: str, pos: str) -> Token:
    return (word, pos, None, False)


def _person(s: SplitSampler, surname_only: bool = False) -> list[Token]:
    rng = s.rng
    if surname_only:
        return _entity(s.pick("particle") if rng.random() < 0.08 else s.pick("last"), "PER")
    r = rng.random()
    first = s.pick("first")
    if r < 0.10:
        name = f"{first} {s.pick('particle')}"
    elif r < 0.16:
        name = f"{first} {rng.choice(string.ascii_uppercase)}. {s.pick('last')}"
    elif r < 0.21:
        name = f"{first} {s.pick('last')}-{s.pick('last')}"
    elif r < 0.33:
        name = s.pick("last")
    else:
        name = f"{first} {s.pick('last')}"
    return _entity(name, "PER")


def _expand(slot: str, s: SplitSampler) -> list[Token]:
    rng = s.rng
    if slot == "PER":
        return _person(s)
    if slot == "PERL":
        return _person(s, surname_only=True)
    if slot == "CITY":
        return _entity(s.pick("city"), "LOC")
    if slot == "COUNTRY":
        return _entity(s.pick("country"), "LOC")
    if slot == "LOC":
        return _entity(s.pick("city" if rng.random() < 0.5 else "country"), "LOC")
    if slot == "REGION":
        name = s.pick("region")
        if name.startswith("the "):
            return [_plain("the", "DT")] + _entity(name[4:], "LOC")
        return _entity(name, "LOC")
    if slot == "COMP":
        return _entity(s.pick("company"), "ORG")
    if slot == "GOV":
        return _entity(s.pick("org"), "ORG")
    if slot == "ORG":
        return _entity(s.pick("company" if rng.random() < 0.5 else "org"), "ORG")
    if slot == "CLUB":
        return _entity(s.pick("club"), "ORG")
    if slot == "NAT":
        return _entity(s.pick("nat"), "MISC", pos="JJ")
    if slot == "EVENT":
        return _entity(s.pick("event"), "MISC")
    if slot == "PRODUCT":
        return _entity(s.pick("product"), "MISC")
    if slot == "NUM":
        n = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 99999)])
        return [_plain(f"{n:,}" if n >= 10000 and rng.random() < 0.5 else str(n), "CD")]
    if slot == "SMALL":
        return [_plain(str(rng.randint(1, 20)), "CD")]
    if slot == "SCORE":
        return [_plain(str(rng.choice([0, 0, 1, 1, 1, 2, 2, 3, 4, 5])), "CD")]
    if slot == "SCORELINE":
        return [_plain(f"{rng.randint(0, 7)}-{rng.randint(0, 6)}", "CD")]
    if slot == "PCT":
        return [_plain(f"{rng.randint(0, 30)}.{rng.randint(0, 9)}", "CD")]
    if slot == "MONEY":
        cur = rng.choice(["$", "£", "€"])
        unit = rng.choice(["million", "billion", "million", ""])
        amount = f"{rng.randint(1, 950)}.{rng.randint(0, 99):02d}"
        return [_plain(cur, "$"), _plain(amount, "CD")] + ([_plain(unit, "CD")] if unit else [])
    if slot == "DAY":
        return [_plain(rng.choice(DAYS), "NNP")]
    if slot == "MONTH":
        return [_plain(rng.choice(MONTHS), "NNP")]
    if slot == "YEAR":
        return [_plain(str(rng.randint(1985, 2004)), "CD")]
    if slot == "DATE":
        return [_plain(f"{rng.randint(1994, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", "CD")]
    if slot == "TIME":
        return [_plain(f"{rng.randint(1, 3)}:{rng.randint(0, 59):02d}.{rng.randint(0, 99):02d}", "CD")]
    if slot == "AGE":
        return [_plain(str(rng.randint(19, 78)), "CD")]
    if slot == "SPORT":
        return [_plain(rng.choice(SPORTS), "NN")]
    raise ValueError(f"unknown slot {slot!r}")


def _literal(word: str) -> Token:
    pos = LEXICON.get(word.lower())
    if pos is None:
        if any(c.isdigit() for c in word):
            pos = "CD"
        elif word[:1].isupper():
            pos = "NNP"
        else:
            pos = "NN"
    return _plain(word, pos)


def _render(template: str, s: SplitSampler) -> list[Token]:
    upper = template.startswith("^")
    out: list[Token] = []
    drawn: list[list[Token]] = []
    for piece in template.lstrip("^").split():
        if piece.startswith("{") and piece.endswith("}"):
            toks = _expand(piece[1:-1], s)
            for _ in range(5):  # no "Argentina and Argentina", no club playing itself
                if toks[0][2] is None or toks not in drawn:
                    break
                toks = _expand(piece[1:-1], s)
            drawn.append(toks)
            out.extend(toks)
        elif "{" in piece:  # "+{SMALL}": a literal glued to a number
            prefix, rest = piece.split("{", 1)
            slot, suffix = rest.split("}", 1)
            out.append(_plain(prefix + _expand(slot, s)[0][0] + suffix, "CD"))
        else:
            out.append(_literal(piece))
    if upper:
        out = [(w.upper(), "NNP" if e else p, e, b) for (w, p, e, b) in out]
    return out


def _long_sentence(s: SplitSampler, kind: int) -> list[Token]:
    """A 90-160 word sentence: a long results list, a list of placings, or chained news clauses."""
    rng = s.rng
    target = rng.randint(105, 140)
    if kind == 0:
        out = _render("Results of {EVENT} matches played on {DAY} :", s)
        while len(out) < target - 6:
            out += _render("{CLUB} {SCORE} {CLUB} {SCORE} ,", s)
        out += _render("{CLUB} {SCORE} {CLUB} {SCORE} .", s)
    elif kind == 1:
        out = _render("Leading final placings in the {EVENT} in {CITY} :", s)
        while len(out) < target - 8:
            out += _render("{PER} ( {COUNTRY} ) {TIME} ,", s)
        out += _render("{PER} ( {COUNTRY} ) {TIME} .", s)
    else:
        out = _render("On {DAY} , " + rng.choice(LONG_CLAUSES), s)
        while len(out) < target - 12:
            out += _render(rng.choice(LONG_CONNECTORS) + " " + rng.choice(LONG_CLAUSES), s)
        out += _render(".", s)
    assert 90 <= len(out) <= 160, len(out)
    return out


def _to_rows(tokens: Sequence[Token]) -> list[Row]:
    """Add a simple chunk column and IOB2 NER tags (a mention starts where its slot expansion starts)."""
    rows: list[Row] = []
    prev_pos = ""
    prev_chunk = "O"
    for i, (word, pos, etype, start) in enumerate(tokens):
        assert word and not any(c.isspace() for c in word), repr(word)
        if pos == "TO":  # "to buy" opens a verb phrase, "to London" a prepositional one
            next_pos = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            chunk = "B-VP" if next_pos == "VB" else "B-PP"
        elif pos in NP_TAGS:
            in_np = prev_chunk[2:] == "NP" and prev_pos in NP_TAGS
            modifier_before = prev_pos in {"DT", "JJ", "PRP$", "$"}
            chunk = "I-NP" if in_np and (not start or modifier_before) else "B-NP"
        elif pos in VP_TAGS:
            chunk = "I-VP" if prev_chunk[2:] == "VP" else "B-VP"
        elif pos == "IN":
            chunk = (
                "B-SBAR" if word.lower() in {"that", "while", "as", "after", "before", "since"} else "B-PP"
            )
        elif pos == "RB":
            chunk = "B-ADVP"
        elif pos in {"WDT", "WP", "EX"}:
            chunk = "B-NP"
        else:
            chunk = "O"
        ner = "O" if etype is None else ("B-" if start else "I-") + etype
        rows.append((word, pos, chunk, ner))
        prev_pos, prev_chunk = pos, chunk
    return rows


def _headline(s: SplitSampler) -> list[Token]:
    return _render(
        s.rng.choice(
            [
                "^{SPORT} - {CLUB} BEAT {CLUB} .",
                "^{SPORT} - {NAT} {PERL} WINS {EVENT} .",
                "^{SPORT} - {COUNTRY} DRAW WITH {COUNTRY} .",
                "^{COMP} TO BUY {COMP} STAKE .",
                "^{GOV} WARNS {COUNTRY} OVER TRADE .",
                "^{CITY} STOCKS END LOWER .",
            ]
        ),
        s,
    )


def generate_split(split: str, sampler: SplitSampler) -> list[list[list[Row]]]:
    """Documents -> sentences -> rows, exactly SPLIT_SIZES[split] sentences."""
    rng = sampler.rng
    weights = [w for w, _ in TEMPLATES]
    templates = [t for _, t in TEMPLATES]
    n_total = SPLIT_SIZES[split]
    n_long = LONG_PER_SPLIT[split]
    long_at = sorted(rng.sample(range(10, n_total - 10), n_long))
    docs: list[list[list[Row]]] = []
    count = 0
    while count < n_total:
        doc_len = min(rng.randint(6, 24), n_total - count)
        doc: list[list[Row]] = []
        for j in range(doc_len):
            if count in long_at:
                tokens = _long_sentence(sampler, long_at.index(count) % 3)
            elif j == 0 and rng.random() < 0.5:
                tokens = _headline(sampler)
            elif j <= 1 and rng.random() < 0.4:
                tokens = _render("^{CITY} {DATE}", sampler)
            else:
                tokens = _render(rng.choices(templates, weights=weights)[0], sampler)
            doc.append(_to_rows(tokens))
            count += 1
        docs.append(doc)
    return docs


def format_conll(docs: Iterable[Sequence[Sequence[Row]]]) -> str:
    parts: list[str] = []
    for doc in docs:
        parts.append("-DOCSTART- -X- -X- O\n\n")
        for sent in doc:
            parts.append("".join(f"{w} {p} {c} {n}\n" for w, p, c, n in sent) + "\n")
    return "".join(parts)


def generate_data() -> dict[str, str]:
    """split name -> CoNLL file text."""
    partition = _partition_pools(random.Random(SEED))
    texts = {}
    for i, split in enumerate(SPLIT_SIZES):
        sampler = SplitSampler(random.Random(SEED + 1 + i), partition[split], unseen_p=0.0 if i == 0 else 0.4)
        texts[split] = format_conll(generate_split(split, sampler))
    return texts


def _sentences(conll_text: str) -> list[list[str]]:
    """Words of each sentence (``-DOCSTART-`` lines skipped)."""
    out: list[list[str]] = []
    cur: list[str] = []
    for line in conll_text.split("\n"):
        if not line.strip():
            if cur:
                out.append(cur)
            cur = []
        elif not line.startswith("-DOCSTART-"):
            cur.append(line.split(" ")[0])
    if cur:
        out.append(cur)
    return out


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def _alphabet(corpus: Sequence[str]) -> list[str]:
    chars = set(string.ascii_letters + string.digits + string.punctuation)
    for line in corpus:
        chars.update(line)
    for c in list(chars):
        chars.update(x for x in (c.lower(), c.upper()) if len(x) == 1)
    normalized = {unicodedata.normalize("NFKC", c) for c in chars}
    return sorted(c for c in normalized if len(c) == 1 and not c.isspace())


def build_tokenizer_json(corpus: Sequence[str]) -> str:
    """Train the Unigram tokenizer on ``corpus`` (one sentence a line) and return its tokenizer.json text."""
    # Single-threaded training and encoding, so that the result never depends on thread scheduling.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        from tokenizers import (
            AddedToken,
            Tokenizer,
            decoders,
            normalizers,
            pre_tokenizers,
            processors,
            trainers,
        )
        from tokenizers.models import Unigram

        alphabet = _alphabet(corpus)
        assert SEED_MARK not in alphabet and CHAR_MARK not in alphabet
        tok = Tokenizer(Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIAL_TOKENS,
            unk_token="<unk>",
            initial_alphabet=[*alphabet, SEED_MARK, CHAR_MARK],
            max_piece_length=16,
            show_progress=False,
        )
        # Case variants widen the piece inventory (and cover headline capitals and lowercased input).
        variants = [
            *corpus,
            *(x.lower() for x in corpus),
            *(x.upper() for x in corpus),
            *(x.title() for x in corpus),
        ]
        # The trainer seeds its candidate pieces with substrings that repeat in the list of *distinct* words,
        # so on a corpus this small a frequent word such as "said" never becomes a piece and ends up split into
        # characters. Sentencepiece seeds from running text instead (a word seen twice is a candidate). Mimic
        # that: every word seen at least twice also appears once with a marker character appended, which makes
        # it a repeat; pieces holding the marker are dropped after training.
        counts = Counter(w for line in variants for w in line.split())
        twins = " ".join(w + SEED_MARK for w in sorted(w for w, n in counts.items() if n >= 2))
        # Every character must be a piece (character fallback for unseen words). Characters that training
        # would otherwise drop are appended at a score that depends on hash-set order, so make each one used
        # on its own once: "¤a¤b¤c¤..." (no piece spans "¤", which occurs nowhere else).
        alphabet_word = CHAR_MARK + CHAR_MARK.join(alphabet) + CHAR_MARK
        tok.train_from_iterator([*variants, twins, alphabet_word], trainer=trainer)

        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        assert [p for p, _ in vocab[: len(SPECIAL_TOKENS)]] == SPECIAL_TOKENS
        assert all(p != MASK_TOKEN for p, _ in vocab)
        # The trainer sums floats in hash-map order, so scores differ between runs in the last digits (and
        # pieces with equal scores may swap places): round them and sort, for byte-identical output.
        pieces = sorted(
            (
                (p, round(score, SCORE_DECIMALS))
                for p, score in vocab[len(SPECIAL_TOKENS) :]
                if SEED_MARK not in p and CHAR_MARK not in p
            ),
            key=lambda ps: (-ps[1], ps[0]),
        )
        # XLM-R keeps "<mask>" as the last piece of the model vocabulary; do the same.
        data["model"]["vocab"] = (
            [[p, 0.0] for p in SPECIAL_TOKENS] + [[p, score] for p, score in pieces] + [[MASK_TOKEN, 0.0]]
        )
        data["model"]["unk_id"] = SPECIAL_TOKENS.index("<unk>")
        data["added_tokens"] = []
        tok = Tokenizer.from_str(json.dumps(data))
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
            + [AddedToken(MASK_TOKEN, lstrip=True, special=True, normalized=False)]
        )
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)],
        )
        assert tok.token_to_id(MASK_TOKEN) == tok.get_vocab_size() - 1
        return tok.to_str(pretty=True) + "\n"
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


TOKENIZER_CONFIG = {
    # PreTrainedTokenizerFast (TokenizersBackend in transformers 5) loads tokenizer.json as it is. Naming
    # XLMRobertaTokenizer(Fast) here would make transformers 5 rebuild the pipeline from the vocabulary and
    # drop the NFKC normaliser, and transformers 4 would look for sentencepiece.bpe.model.
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": 512,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "padding_side": "right",
    "truncation_side": "right",
    "clean_up_tokenization_spaces": False,
    "model_input_names": ["input_ids", "attention_mask"],
}

SPECIAL_TOKENS_MAP = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": {
        "content": "<mask>",
        "lstrip": True,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    },
}


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def build_assets(with_tokenizer: bool = True) -> dict[str, str]:
    """Relative path (under the assets folder) -> file text."""
    data = generate_data()
    files = {f"demo/{split}.txt": text for split, text in data.items()}
    if with_tokenizer:
        corpus = [" ".join(words) for split in SPLIT_SIZES for words in _sentences(data[split])]
        files["demo-tokenizer/tokenizer.json"] = build_tokenizer_json(corpus)
        files["demo-tokenizer/tokenizer_config.json"] = _json(TOKENIZER_CONFIG)
        files["demo-tokenizer/special_tokens_map.json"] = _json(SPECIAL_TOKENS_MAP)
    return files


def write_assets(out_dir: Path, with_tokenizer: bool = True) -> list[Path]:
    written = []
    for rel, text in build_assets(with_tokenizer).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="assets folder (default: %(default)s)"
    )
    parser.add_argument(
        "--data-only", action="store_true", help="write only the CoNLL files, not the tokenizer"
    )
    args = parser.parse_args(argv)
    for path in write_assets(args.out_dir, with_tokenizer=not args.data_only):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
