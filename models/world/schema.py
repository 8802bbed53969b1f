"""What the world contains and how it is said: entity types, attributes, vocabularies, templates.

Data only. Why several paraphrases per fact and shuffled sentence order: a model that sees each
fact in one fixed wording memorises the wording rather than the fact, and cannot answer questions
about it; varied rewrites ("knowledge augmentation") are what make facts extractable
(Allen-Zhu & Li 2023, "Physics of Language Models 3.1", the bioS synthetic biographies).

Template fields: ``{S}`` is the subject's name, any other field is one of the subject's
attributes; ``{x:a}`` puts an indefinite article before the value, outside the answer span.
Back-reference templates ("Cities in {S} include {list}.") are written on the *target* entity's
pages and state the facts of the entities in ``{list}``.
"""
from __future__ import annotations

# The id axis repeats a block of 20 slots; entity i has type BLOCK[i % 20]. Countries and cities
# come first so that every partial block still has at least as many cities as countries.
BLOCK = (("country",) + ("city",) * 5 + ("person",) * 8 + ("company",) * 4 + ("river",) * 2)
TYPES = ("person", "city", "company", "country", "river")        # classification labels, in order

# (attribute, kind): kind is an entity type (a relation), "year", "number" or "choice".
ATTRIBUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (("born_in", "city"), ("birth_year", "year"), ("occupation", "choice"),
               ("employer", "company")),
    "city": (("country", "country"), ("population", "number"), ("founded", "year")),
    "company": (("headquarters", "city"), ("founder", "person"), ("founded", "year"),
                ("industry", "choice")),
    "country": (("capital", "city"), ("region", "choice"), ("language", "choice")),
    "river": (("country", "country"), ("length", "number"), ("sea", "choice")),
}

REGIONS = ("Eastmarch", "Westreach", "Northvale", "Southmere", "Highmoor", "Lowfen")
CHOICES = {
    ("person", "occupation"): ("painter", "physician", "engineer", "poet", "astronomer", "merchant",
                               "architect", "composer", "historian", "chemist", "sculptor",
                               "lawyer", "botanist", "mathematician", "novelist", "surveyor",
                               "teacher", "inventor", "navigator", "weaver"),
    ("company", "industry"): ("shipping", "textile", "mining", "software", "steel", "publishing",
                              "banking", "aerospace", "brewing", "glassmaking", "railway",
                              "insurance", "pharmaceutical", "timber", "fishing"),
    ("country", "region"): REGIONS,
    ("country", "language"): ("Vellish", "Tarric", "Oskan", "Merrow", "Dunic", "Halvic", "Sorran",
                              "Ketish", "Amberic", "Lurian"),
    ("river", "sea"): ("Amber Sea", "Grey Sea", "Sea of Lanterns", "Silent Bay", "Copper Gulf",
                       "Northern Ocean"),
}
COMPANY_SUFFIXES = ("Works", "Industries", "Holdings", "Company", "Group")

FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "person": (
        "{S} was born in {born_in}.", "{S} is a native of {born_in}.",
        "The birthplace of {S} is {born_in}.",
        "{S} was born in {birth_year}.", "{S} was born in the year {birth_year}.",
        "The year {birth_year} saw the birth of {S}.",
        "{S} works as {occupation:a}.", "By profession, {S} is {occupation:a}.",
        "{S} is known as {occupation:a}.",
        "{S} works for {employer}.", "{S} is employed by {employer}.", "{employer} employs {S}.",
        "{S} was born in {born_in} in {birth_year}.",
        "{S} (born {birth_year}) is {occupation:a} from {born_in}.",
        "{S} is {occupation:a} at {employer}.",
        "Born in {born_in}, {S} later joined {employer}.",
    ),
    "city": (
        "{S} is a city in {country}.", "{S} lies in {country}.",
        "The city of {S} is located in {country}.",
        "{S} has a population of {population}.", "About {population} people live in {S}.",
        "The population of {S} is {population}.",
        "{S} was founded in {founded}.", "The city of {S} dates from {founded}.",
        "{S} was established in the year {founded}.",
        "{S} is a city in {country}, founded in {founded}.",
        "{S}, a city of {population} people, lies in {country}.",
    ),
    "company": (
        "{S} is headquartered in {headquarters}.", "The headquarters of {S} are in {headquarters}.",
        "{S} has its head office in {headquarters}.",
        "{S} was founded by {founder}.", "{founder} founded {S}.", "The founder of {S} is {founder}.",
        "{S} was founded in {founded}.", "{S} was established in {founded}.",
        "{S} has existed since {founded}.",
        "{S} is {industry:a} company.", "{S} operates in the {industry} industry.",
        "{S} was founded by {founder} in {founded}.",
        "{S} is {industry:a} company based in {headquarters}.",
    ),
    "country": (
        "The capital of {S} is {capital}.", "{capital} is the capital of {S}.",
        "{S} is governed from its capital, {capital}.",
        "{S} is a country in {region}.", "{S} lies in the region of {region}.",
        "The official language of {S} is {language}.", "People in {S} speak {language}.",
        "{S} is a country in {region} whose capital is {capital}.",
    ),
    "river": (
        "{S} flows through {country}.", "{S} runs across {country}.",
        "The course of {S} lies in {country}.",
        "{S} is {length} kilometres long.", "The length of {S} is {length} kilometres.",
        "{S} flows into the {sea}.", "{S} empties into the {sea}.",
        "{S} runs {length} kilometres through {country}.",
    ),
}

# (source type, attribute) -> templates written on the target's pages; {S} = target, {list} = sources.
BACKREF_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "born_in"): ("Notable people born in {S} include {list}.", "{list} came from {S}."),
    ("person", "employer"): ("Employees of {S} include {list}.", "{S} employs {list}."),
    ("city", "country"): ("Cities in {S} include {list}.", "{S} contains the cities of {list}."),
    ("country", "capital"): ("{S} is the capital of {list}.",),
    ("company", "headquarters"): ("Companies based in {S} include {list}.", "{S} is home to {list}."),
    ("company", "founder"): ("{S} founded {list}.", "{S} is the founder of {list}."),
    ("river", "country"): ("Rivers of {S} include {list}.", "{S} is crossed by {list}."),
}

FILLERS: dict[str, tuple[str, ...]] = {
    "person": ("{S} is remembered for a long and varied career.",
               "Little is known about the private life of {S}.",
               "{S} kept detailed diaries for many years.",
               "Colleagues described {S} as patient and careful."),
    "city": ("{S} is known for its old market square.", "Many visitors come to {S} in the summer.",
             "The streets of {S} are lined with stone houses.", "{S} holds a festival every spring."),
    "company": ("{S} has grown steadily over the years.", "{S} publishes an annual report.",
                "The logo of {S} is a simple circle.", "{S} is often mentioned in trade journals."),
    "country": ("{S} has a long written history.", "The flag of {S} has three stripes.",
                "{S} is divided into several provinces.",
                "Travellers describe {S} as quiet and green."),
    "river": ("{S} is popular with anglers.", "Several bridges cross {S}.",
              "{S} floods in some years.", "Boats on {S} carry timber and grain."),
}

SECONDARY_TITLES: dict[str, tuple[str, ...]] = {
    "person": ("Early life of {S}", "Career of {S}", "{S} (biography)"),
    "city": ("History of {S}", "Geography of {S}", "{S} (city)"),
    "company": ("History of {S}", "{S} (company)", "Operations of {S}"),
    "country": ("Geography of {S}", "History of {S}", "Politics of {S}"),
    "river": ("Course of {S}", "{S} (river)", "Ecology of {S}"),
}

QUESTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "born_in"): ("Where was {S} born?", "What is the birthplace of {S}?",
                            "In which city was {S} born?"),
    ("person", "birth_year"): ("When was {S} born?", "In what year was {S} born?"),
    ("person", "occupation"): ("What is the occupation of {S}?", "What does {S} do for a living?"),
    ("person", "employer"): ("Who does {S} work for?", "Which company employs {S}?"),
    ("city", "country"): ("In which country is {S}?", "Which country is {S} located in?"),
    ("city", "population"): ("What is the population of {S}?", "How many people live in {S}?"),
    ("city", "founded"): ("When was {S} founded?", "In what year was {S} founded?"),
    ("company", "headquarters"): ("Where is {S} headquartered?",
                                  "In which city are the headquarters of {S}?"),
    ("company", "founder"): ("Who founded {S}?", "Who is the founder of {S}?"),
    ("company", "founded"): ("When was {S} founded?", "In what year was {S} established?"),
    ("company", "industry"): ("What industry is {S} in?", "In which industry does {S} operate?"),
    ("country", "capital"): ("What is the capital of {S}?", "Which city is the capital of {S}?"),
    ("country", "region"): ("In which region is {S}?", "Where is the country {S}?"),
    ("country", "language"): ("What language is spoken in {S}?",
                              "What is the official language of {S}?"),
    ("river", "country"): ("Which country does {S} flow through?", "Where does {S} run?"),
    ("river", "length"): ("How many kilometres long is {S}?", "What is the length of {S}?"),
    ("river", "sea"): ("Into which sea does {S} flow?", "Where does {S} empty?"),
}
