"""Label words for the shipped classification tasks (TREC coarse classes, AG News).

``*_MANUAL``: one or two words per class for a ManualVerbalizer (the class names, as in PET).
``*_KNOWLEDGEABLE``: expanded sets for a KnowledgeableVerbalizer, the first word of each being
the class name (KPT's anchor). KPT builds its sets from knowledge bases (Related Words,
ConceptNet); there is no internet here, so these were written by hand from the label names:
small, unweighted, and meant to be refined (``KnowledgeableVerbalizer.refine``).
"""
from __future__ import annotations

TREC_MANUAL = {
    "ABBR": ["abbreviation"], "DESC": ["description"], "ENTY": ["entity"],
    "HUM": ["human", "person"], "LOC": ["location", "place"], "NUM": ["number"],
}

TREC_KNOWLEDGEABLE = {
    "ABBR": ["abbreviation", "acronym", "short", "stand", "initials", "expansion", "shorthand"],
    "DESC": ["description", "definition", "meaning", "reason", "manner", "explanation", "why", "how"],
    "ENTY": ["entity", "thing", "object", "animal", "food", "color", "sport", "product", "event"],
    "HUM": ["human", "person", "people", "individual", "name", "who", "group", "title"],
    "LOC": ["location", "place", "city", "country", "state", "where", "mountain", "region"],
    "NUM": ["number", "count", "date", "year", "amount", "quantity", "distance", "money", "percent"],
}

AGNEWS_MANUAL = {
    "World": ["world", "politics"], "Sports": ["sports"], "Business": ["business"],
    "Sci/Tech": ["science", "technology"],
}

AGNEWS_KNOWLEDGEABLE = {
    "World": ["world", "politics", "government", "war", "election", "international", "country",
              "minister", "president", "military"],
    "Sports": ["sports", "game", "team", "football", "baseball", "basketball", "soccer", "match",
               "championship", "player"],
    "Business": ["business", "economy", "market", "company", "stock", "finance", "trade", "profit",
                 "bank", "industry"],
    "Sci/Tech": ["science", "technology", "computer", "software", "internet", "research", "space",
                 "physics", "biology", "digital"],
}
