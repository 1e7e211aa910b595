"""Simulated replies to the negatives prompts: plausible requests and answers, and the ways real models
get them wrong.

A negatives request (a system prompt that starts with ``QUERIES_MARKER`` or ``ANSWER_MARKER``, see
``negatives/prompts.py``) is always answered from its original user message, ``messages[1]``, also
when the client re-asks after a rejected reply (then the list has four messages)::

    queries  {"scenario", "tools", "count"}  ->  {"queries": [..]}, exactly count strings
             query i is drawn by random.Random(f"{digest}:{i}"): a template filled slot by slot
             (ask, topic, place, time, tone, ...; topics come from the tools' names/descriptions)
               no_tools          requests that need an action or live data: in the tools' domain
                                 (DOMAIN_ASKS) or, without tools, everyday tasks (EVERYDAY_ASKS)
               irrelevant_tools  requests near the tools' domain they cannot serve (NEAR_ASKS),
                                 or general questions (GENERAL_ASKS)
    answer   {"scenario", "tools", "query"}  ->  plain prose, drawn by random.Random(digest)
             the query's intent (intent_of: booking, buying, sending, live data, ...) picks the banks
               no_tools, or an action asked for      honest(): what cannot be done + what can
               irrelevant_tools otherwise             direct(): a general answer, naming no tool
    negative_reply(messages, digest, rate)
             int(digest[:8], 16) / 16**8 < rate  ->  corrupt_answer / corrupt_queries(request, reply, kind),
             kind = KINDS[int(digest[8:16], 16) % len(KINDS)]; else the plausible reply

The digest is the simulator's sha256 of the whole message list, so every request, re-asks included,
draws on its own. Each corruption is a way real models go wrong, and the validators catch it::

    answers (answer_problem)                                  queries (queries_problem)
    react_call     Thought:/Action:/Action Input: lines       wrong_count   one query missing or extra
    json_call      {"name": .., "arguments": ..}, maybe fenced broken_json   the reply cut in the middle
    python_call    tool.func(arg=..)                          cut_off       cut short, finish "length"
    goal_protocol  goal:/name:/args: lines                    empty_query   one query ""
    tool_calls     a "tool_calls": [..] fragment
    claimed_action "I've booked ..." and the like
    empty          nothing but white space
    cut_off        cut short, finish_reason "length"

Calls name an offered tool, or an invented one fitting the query when none is offered. A user message
that is not a JSON object counts as ``{}``: no queries, and an answer to an empty request.
"""

from __future__ import annotations

import json
import random
import re
from string import Formatter

from agentflan_ray.llm.sim_rewrite import parse_request  # the original request, re-asks too
from agentflan_ray.negatives.prompts import ANSWER_MARKER, QUERIES_MARKER

MAX_QUERIES = 100  # a larger count is answered with this many

# Slots shared by the request templates; a template names the ones it fills.
SLOTS = {
    "ask": ("Can you", "Could you", "Would you", "Hey, can you", "Any chance you could", "Quick favour: can you",
            "Could you please", "Is it possible to"),
    "please": ("Please", "I need you to", "Go ahead and", "Kindly", "Right away,", "When you get a sec,"),
    "lookup": ("look up", "check", "pull up", "find", "get me", "fetch", "dig up", "track down"),
    "live": ("current", "latest", "live", "up-to-date", "real-time", "most recent", "newest"),
    "place": ("Lisbon", "Osaka", "Denver", "Cape Town", "Edinburgh", "Seoul", "Austin", "Vancouver", "Marrakesh",
              "Melbourne", "Prague", "Munich", "Hanoi", "Dublin", "Chicago", "Reykjavik", "Nairobi", "Porto",
              "Kyoto", "Boston", "Istanbul", "Lima", "Oslo", "Montreal"),
    "place2": ("Madrid", "Tokyo", "Seattle", "Berlin", "Toronto", "Athens", "Singapore", "Rome", "Amsterdam",
               "Sydney", "Vienna", "Mexico City"),
    "when": ("", " tomorrow", " this weekend", " tonight", " next Friday", " on Monday morning", " before noon",
             " for the next three days", " later today", " on the 14th", " over the holidays"),
    "deliver": ("text me the result", "email a summary to my manager", "send it to my sister", "book the best option",
                "share it with the team", "add it to my calendar", "forward it to Priya", "order whatever fits"),
    "reason": ("", "I'm about to head out.", "We're deciding tonight.", "My meeting starts in an hour.",
               "Need it for a report.", "Trying to plan the weekend.", "My flight lands soon.", "Thanks!",
               "It's a bit urgent.", "Cheers.", "My phone is almost dead.", "The kids are waiting."),
    "situation": ("planning a trip with my kids", "on a tight budget this month", "travelling for work next week",
                  "helping my parents plan something", "putting together a report for Monday", "new to the area",
                  "organising a surprise for a friend", "trying to decide between two options",
                  "short on time today", "sorting things out for my team"),
    "act": ("book the best option", "reserve something suitable", "order what I need", "send me an alert",
            "set up a booking", "message the organiser", "buy the cheapest option"),
    "nudge": ("can you check?", "what does it look like?", "anything new?", "please look it up.",
              "find out for me?", "can you get that for me?", "send me the details?"),
    "n": ("2", "3", "4", "5", "6", "two", "four"),
    "person": ("my sister", "Priya", "my landlord", "the team", "Marco", "my boss", "Jenna", "my dad",
               "our accountant", "Tom from accounts"),
    "cuisine": ("an Italian", "a Thai", "a vegan", "a sushi", "a Mexican", "a Lebanese", "a steak",
                "a Korean barbecue", "an Ethiopian", "a seafood"),
    "minutes": ("5", "10", "15", "20", "30", "45"),
    "item": ("a bag of coffee beans", "new running shoes", "printer ink", "a birthday cake", "two pizzas",
             "a phone charger", "dog food", "a desk lamp", "groceries for the week", "flowers for my mum"),
    "stock": ("Apple", "Tesla", "Nvidia", "Microsoft", "Amazon", "Toyota", "Shopify", "Netflix", "Samsung",
              "Spotify"),
    "document": ("signed contract", "quarterly report", "meeting notes", "updated budget", "slides from today",
                 "invoice for March"),
    "deadline": ("5 pm", "the end of the day", "tomorrow morning", "Friday", "lunch", "the meeting"),
    "team": ("Lakers", "Arsenal", "Yankees", "Real Madrid", "Chiefs", "Celtics", "Barcelona", "Dodgers",
             "Liverpool", "Maple Leafs"),
    "event": ("the jazz festival", "the Coldplay concert", "the new Dune film", "the science museum",
              "a comedy show", "the football match", "the ballet", "a food tour"),
    "chore": ("call the dentist", "water the plants", "pay the electricity bill", "pick up the dry cleaning",
              "renew my passport", "book the car service", "send Mum a birthday card"),
    "shop": ("pharmacy", "hardware store", "post office", "bakery", "library", "bike shop", "supermarket",
             "vet clinic"),
    "amount": ("50", "120", "300", "75", "1,000", "40"),
    "day": ("Monday", "the 3rd", "next Thursday", "tomorrow", "the 21st", "Saturday"),
    "venue": ("the airport", "the train station", "the city hospital", "my office", "the stadium",
              "the conference centre"),
    "lead": ("", "Quick question: ", "I've always wondered: ", "Random one, ", "For a school project: ",
             "Help me out here. ", "Honest question: ", "Settle a debate for me: ", "Out of curiosity, ",
             "My friend asked me this: ", "Hi! ", "Something I keep forgetting: "),
    "curious": ("", "Just curious.", "I've never really understood it.", "Keep it simple, please.",
                "A short explanation is fine.", "No rush.", "Bullet points are fine.", "Thanks in advance!",
                "Be honest.", "One paragraph is plenty.", "Examples would help.", "I'm a total beginner."),
    "length": ("in a few sentences", "in one paragraph", "in three bullet points", "for a teenager",
               "without spoilers", "in plain words"),
    "aspect": ("in general", "for a beginner", "on a small budget", "when travelling abroad", "for a family",
               "for a small business", "in a new city", "over the long term", "in everyday life", "for students"),
    "audience": ("a ten-year-old", "my grandmother", "a new colleague", "a room full of students",
                 "someone who hates jargon", "a visiting friend", "a busy manager", "my book club"),
    "tone": ("", " in a cheerful tone", " for a colleague", " that rhymes", " in the style of a sports commentator",
             " for my grandmother", " with a twist at the end"),
    "skill": ("the piano", "to swim", "Japanese", "to code", "to draw", "chess", "to dance salsa", "woodworking"),
    "choice": ("renting versus buying a home", "working from home", "an electric car", "a gap year",
               "intermittent fasting", "a standing desk", "learning two languages at once", "living abroad"),
    "classic": ("Pride and Prejudice", "The Odyssey", "Nineteen Eighty-Four", "Moby-Dick", "Hamlet",
                "The Little Prince", "Frankenstein", "Don Quixote"),
    "naming": ("a golden retriever puppy", "a bakery", "a book club", "a podcast about gardening",
               "a fantasy kingdom", "a hiking group", "a pet turtle", "a board game night"),
    "novice": ("completely new to this", "twelve years old", "not very technical", "a retired teacher",
               "switching careers", "learning English"),
    "form": ("poem", "haiku", "limerick", "product description", "tweet", "thank-you note", "story for kids",
             "rhyming couplet"),
    "task": ("make a sourdough starter", "negotiate a higher salary", "fall asleep faster",
             "start running as a beginner", "write a good cover letter", "keep basil alive indoors",
             "learn to touch-type", "save money on groceries", "prepare for a job interview",
             "get rid of fruit flies", "clean a cast-iron pan", "stay focused while studying",
             "fix a squeaky door", "choose a good password"),
    "concept": ("compound interest", "how vaccines work", "the greenhouse effect", "what a black hole is",
                "photosynthesis", "inflation", "how a bill becomes law", "machine learning", "the water cycle",
                "supply and demand", "why the sky is blue", "how credit scores work", "how tides work",
                "what DNA does"),
    "pair": ("a virus and a bacterium", "weather and climate", "a latte and a flat white", "stocks and bonds",
             "baking soda and baking powder", "an alligator and a crocodile", "a simile and a metaphor",
             "RAM and storage", "a hurricane and a typhoon", "empathy and sympathy", "a lake and a pond",
             "jam and jelly"),
    "theme": ("autumn mornings", "my cat", "a long train ride", "friendship", "the ocean", "Monday coffee",
              "moving to a new city", "rainy weekends", "learning to cook", "an old bicycle", "first snow",
              "a lost umbrella"),
    "goal": ("staying productive at home", "a first marathon", "public speaking", "learning a new language",
             "keeping a plant alive", "a long-haul flight", "writing clearer emails", "a tidy kitchen",
             "a calmer morning routine", "meeting new people"),
    "days": ("3", "5", "7", "10", "14"),
    "subject": ("calculus", "Spanish verbs", "organic chemistry", "a driving test", "the bar exam", "Python basics",
                "world history", "music theory"),
}

DOMAIN_ASKS = (  # no_tools, with tools: requests that need the tools' live data or actions ({topic})
    "{ask} {lookup} the {live} {topic} for {place}{when}?",
    "{please} {lookup} the {live} {topic} for {place}{when} and {deliver}.",
    "What's the {live} {topic} in {place} right now? {reason}",
    "I'm {situation}. {ask} {lookup} the {topic} for {place}{when}?",
    "{topic} for {place}{when}: {nudge}",
    "{ask} {act} based on the {live} {topic} for {place}{when}?",
)
EVERYDAY_ASKS = (  # no_tools, without tools: everyday tasks that need an action or live data
    "{ask} book a table for {n} at {cuisine} restaurant in {place}{when}?",
    "What's the weather going to be like in {place}{when}? {reason}",
    "{please} text {person} that I'll be {minutes} minutes late. {reason}",
    "{please} order {item} and have it delivered{when}. {reason}",
    "{ask} check the current price of {stock} stock? {reason}",
    "{ask} find me the cheapest flight from {place} to {place2}{when}?",
    "{please} email {person} the {document} before {deadline}. {reason}",
    "What's the score of the {team} game right now? {reason}",
    "{ask} buy {n} tickets for {event} in {place}{when}?",
    "{please} remind me to {chore}{when}. {reason}",
    "{ask} look up the opening hours of the nearest {shop} in {place}? {reason}",
    "{please} transfer {amount} dollars to {person}{when}. {reason}",
    "{ask} check if there are train delays between {place} and {place2}{when}?",
    "{please} reserve a hotel room in {place} for {n} nights from {day}. {reason}",
    "What are the top news headlines in {place} today? {reason}",
    "{ask} get me a taxi to {venue}{when}? {reason}",
)
NEAR_ASKS = (  # irrelevant_tools, with tools: near the tools' domain, nothing they can serve ({topic})
    "{lead}how does {topic} usually work {aspect}? {curious}",
    "{lead}what should I keep in mind about {topic} when I'm {situation}? {curious}",
    "{lead}explain what {topic} means to someone who is {novice}. {curious}",
    "Write a short {form} about {topic}{tone}. {curious}",
    "{lead}what are the most common mistakes people make with {topic} {aspect}? {curious}",
    "Give me {n} general tips about {topic} {aspect}, just the basics. {curious}",
    "{lead}why do people care so much about {topic} {aspect}? {curious}",
    "{lead}how would you explain {topic} to {audience}? {curious}",
)
GENERAL_ASKS = (  # irrelevant_tools: questions no tool is needed for
    "{lead}how do I {task}? {curious}",
    "{lead}explain {concept} in simple terms. {curious}",
    "{lead}how would you explain {concept} to {audience}? {curious}",
    "{lead}what's the difference between {pair}? {curious}",
    "Write a short {form} about {theme}{tone}. {curious}",
    "{lead}give me {n} tips for {goal}. {curious}",
    "{lead}can you help me plan a {days}-day study schedule for {subject}? {curious}",
    "{lead}is it worth learning {skill} as an adult? {curious}",
    "{lead}what are the pros and cons of {choice}? {curious}",
    "{lead}summarize the main ideas of {classic} {length}. {curious}",
    "{lead}suggest {n} names for {naming}. {curious}",
)

STOP = frozenset({  # words that say nothing about a tool's topic
    "a", "add", "aggregate", "an", "and", "api", "are", "by", "check", "coming", "create", "curr", "detail",
    "fetch", "filter", "find", "for", "forecast", "from", "get", "in", "info", "is", "list", "look",
    "nearby", "now", "of", "on", "out", "playing", "plugin", "print", "query", "read", "reserve",
    "retrieve", "save", "search", "send", "show", "the", "this", "to", "today", "tool", "tools", "up",
    "use", "useful", "when", "which", "with", "write", "you", "your"
})
WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")

INTENTS = (  # the first that matches the query wins
    ("booking", re.compile(r"\b(?:book|booking|reserve|reservation|appointment|taxi|tickets?|flights?|hotel)\b", re.I)),
    ("buying", re.compile(r"\b(?:buy|order|purchase|pay|transfer|delivered|delivery)\b", re.I)),
    ("sending", re.compile(r"\b(?:send|text|e-?mail|message|remind|notify|forward)\b", re.I)),
    ("live", re.compile(r"\b(?:current|latest|live|real-time|today|tonight|now|weather|forecast|prices?|score|"
                        r"news|headlines|delays?|status|availability|up-to-date|most recent|opening hours)\b", re.I)),
    ("compare", re.compile(r"difference between|\bversus\b|\bvs\b|\bcompare\b", re.I)),
    ("write", re.compile(r"\b(?:write|draft|compose|poem|haiku|limerick|story|toast|tweet|couplet)\b", re.I)),
    ("howto", re.compile(r"\bhow (?:do|can|should) i\b|\bhow to\b|\btips?\b|\bsteps?\b|\bplan\b|\bschedule\b|"
                         r"\bmistakes\b|keep in mind", re.I)),
    ("explain", re.compile(r"\bexplain|\bwhat (?:is|are|does)\b|\bwhy\b|\bhow does\b|\bmeans?\b", re.I)),
)
ACTIONS = ("booking", "buying", "sending")  # intents an answer declines even when it answers directly

OPENERS = ("I'd like to help with this, but I should be upfront.", "Thanks for asking.",
           "Happy to help as far as I can.", "Sure, let me explain what I can do here.", "Good question.", "")
CANNOT = {
    "booking": ("I can't make bookings or reservations from here, and I can't see live availability.",
                "I don't have a way to reserve anything on your behalf or to see what is free right now.",
                "Booking isn't something I can do from this chat, and I have no access to current availability "
                "or prices."),
    "buying": ("I can't place orders, make payments or move money for you.",
               "I don't have access to shops, payment services or your accounts, so I can't complete a purchase.",
               "Buying things or handling payments isn't something I can do from here."),
    "sending": ("I can't send messages, emails or reminders for you from here.",
                "I have no way to reach other people or your accounts, so the message is one you'll need to send "
                "yourself.",
                "Sending messages on your behalf is outside what I can do in this chat."),
    "live": ("I don't have access to live data, so I can't give you current figures or today's status.",
             "I can't see real-time information such as today's prices, scores, schedules or forecasts.",
             "My knowledge isn't connected to live sources, so anything current from me would be a guess."),
    "other": ("I can't look things up online or act in other apps from here.",
              "I don't have a way to search the web or reach outside services in this chat.",
              "I can't fetch outside information or carry out actions for you from this chat."),
}
CAN = {
    "booking": ("What I can do is help you choose: settle your dates, budget and must-haves first, then compare two "
                "or three options on the provider's own site or a trusted booking app.",
                "A good approach is to go to the venue's official website or app, compare the cancellation terms, "
                "and book directly once the details look right.",
                "I'd suggest phoning the provider or visiting their website; booking a little in advance and keeping "
                "a flexible backup usually helps."),
    "buying": ("I can help you decide what to get: compare prices at two or three trusted retailers, look at "
               "delivery times and return policies, and read a few recent reviews before ordering.",
               "If you share your budget and preferences, I can suggest what to look for so the purchase goes "
               "smoothly when you make it yourself.",
               "For payments, your bank's app or website is the safest route; double-check the recipient and the "
               "amount before confirming."),
    "sending": ("I'm happy to draft the message so you can paste it into your email or phone and send it yourself.",
                "If you tell me the main points, I can write a short, clear version for you to send.",
                "I can help with the wording: a friendly opening, the key point in one sentence and a clear next "
                "step usually work well."),
    "live": ("For up-to-date figures, a dedicated app or the official website will have the current numbers, and I "
             "can help you make sense of them once you have them.",
             "You'll get accurate, current information from an official source or a reliable app; I can explain "
             "what to look for and how to read it.",
             "If you look at a trusted source and share what you see, I can help you interpret it or plan around "
             "it."),
    "other": ("I can still help with general advice, explanations and step-by-step guidance based on what I know.",
              "If you find the details on an official site, I can help you understand them and decide what to do "
              "next.",
              "Tell me a bit more about what you need, and I can suggest the steps to get it done yourself."),
}
CLOSINGS = ("Would you like help with that?", "Just let me know how you'd like to proceed.",
            "Tell me more and I'll tailor the suggestions.", "I hope that helps you get it sorted.", "")

LEADS = ("This doesn't need any of the tools I have, so here's a direct answer.", "Sure, here's a general answer.",
         "Good question.", "Happy to help with that.", "Here's how I'd think about it.", "")
DIRECT = {  # intent -> (first sentences, second sentences)
    "compare": (("The short version is that they differ mainly in what they are for and how they behave in "
                 "practice.",
                 "They are easy to mix up, but each has its own purpose, strengths and typical use.",
                 "People often treat them as the same thing, yet the details that set them apart matter in "
                 "everyday life."),
                ("A practical way to tell them apart is to ask what problem each one solves and what it costs you "
                 "in time, money or effort.",
                 "Once you look at how each one is made or measured, the difference becomes clear quickly.",
                 "In most everyday situations one is the safer default, and the other shines in more specific "
                 "cases.")),
    "howto": (("Start small and make the first step easy, so you can build a habit before adding more.",
               "Break it into three parts: prepare what you need, do the core step carefully, then review what "
               "worked.",
               "Most people get the best results by setting a clear goal, keeping a simple routine and adjusting "
               "after a week or two."),
              ("Avoid the common trap of doing too much at once; steady, small improvements add up quickly.",
               "Keep notes as you go, since that makes it much easier to see what to change.",
               "If something isn't working after a fair try, change one thing at a time rather than everything.")),
    "explain": (("In simple terms, it is about cause and effect: a few basic ingredients interact, and the result "
                 "is what you notice.",
                 "The core idea is simpler than it sounds: there is one basic mechanism, and most of the details "
                 "are variations on it.",
                 "Think of it as a system with inputs and outputs; once you see what goes in and what comes out, "
                 "the rest follows."),
                ("An everyday comparison helps: it works a bit like a recipe, where changing one ingredient changes "
                 "the whole dish.",
                 "The details can get technical, but that main idea covers most of what you'll come across.",
                 "If you want, I can go one level deeper with a concrete example.")),
    "other": (("Generally speaking, it depends on your situation, but a few principles hold in most cases.",
               "There's no single right answer, though the usual advice is to start with the basics and adjust "
               "from there.",
               "The most reliable approach is to be clear about what you want, weigh the trade-offs and pick the "
               "simplest option that works."),
              ("Think about what matters most to you, such as time, cost or convenience, and let that guide the "
               "choice.",
               "Talking it through with someone experienced, or reading a trusted guide, can also help.",
               "Happy to go into more detail on any part of it.")),
}
COUPLETS = ("Soft light settles on the quiet street,\nand every hurried thing slows down its feet.",
            "A kettle hums a patient tune;\nthe afternoon will find us soon.",
            "The hours unfold at their own pace,\nand small things shine when given space.",
            "A breeze turns pages no one reads,\nand scatters all our little needs.",
            "We keep the moments worth the keeping,\nwhile the rest of town is sleeping.",
            "So here's to days both plain and bright,\nthat end in something close to right.")
INVENTED = {"booking": "book_reservation", "buying": "place_order", "sending": "send_message",
            "live": "get_live_data", "other": "web_search"}
CLAIMS = {
    "booking": ("I have booked it for you and the confirmation is on its way.",
                "Done! I've reserved a spot for you."),
    "buying": ("I've ordered it for you; it should arrive in two days.", "I have purchased it with your saved card."),
    "sending": ("I've sent the message for you.", "Done: I have emailed them the details."),
    "live": ("I just checked the latest figures and everything looks fine.", "I've looked up the current data for you."),
    "other": ("I've searched the web and found the answer.", "I have retrieved the information you asked for."),
}


def is_negative(messages: list[dict]) -> bool:
    first = messages[0] if messages else {}
    content = str(first.get("content") or "")
    return first.get("role") == "system" and content.startswith((QUERIES_MARKER, ANSWER_MARKER))


def is_queries(messages: list[dict]) -> bool:
    return str(messages[0].get("content") or "").startswith(QUERIES_MARKER)


def _string(value) -> str:
    return value if isinstance(value, str) else ""


def tools_of(request: dict) -> list[dict]:
    """The offered tools as ``{"name", "description"}`` strings; entries without a name are left out."""
    tools = request.get("tools")
    entries = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    return [{"name": _string(t.get("name")), "description": _string(t.get("description"))}
            for t in entries if _string(t.get("name")).strip()]


def count_of(request: dict) -> int:
    count = request.get("count")
    return min(max(count, 0), MAX_QUERIES) if isinstance(count, int) and not isinstance(count, bool) else 0


def _content_words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text) if w.lower() not in STOP]


def topic(tool: dict) -> str:
    """What a tool is about in a few words: its function's name without verbs and ``by ...`` tails, else its
    namespace, else its description's first words."""
    namespace, _, function = tool["name"].rpartition(".")
    words = [w.lower() for w in WORD.findall(function)]
    for tail in ("by", "with"):
        words = words[: words.index(tail)] if tail in words else words
    words = [w for w in words if w not in STOP] or _content_words(namespace)
    words = words or [w for w in _content_words(tool["description"]) if len(w) >= 4][:2]
    return " ".join(words[:4])


def topics(tools: list[dict]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for tool in tools if (t := topic(tool))))


def fill(template: str, rng: random.Random, slots: dict) -> str:
    """The template with each slot drawn from its bank, capitalized, without stray spaces."""
    fields = sorted({name for _, name, _, _ in Formatter().parse(template) if name})
    text = " ".join(template.format(**{name: rng.choice(slots[name]) for name in fields}).split())
    return text[:1].upper() + text[1:]


def _templates(scenario: str, subjects: tuple[str, ...], rng: random.Random) -> tuple[str, ...]:
    if scenario == "irrelevant_tools":
        return NEAR_ASKS if subjects and rng.random() < 0.5 else GENERAL_ASKS
    return DOMAIN_ASKS if subjects else EVERYDAY_ASKS


def plausible_queries(request: dict, digest: str) -> list[str]:
    """``count`` distinct requests of the scenario, each drawn from the digest and its index."""
    scenario, subjects = _string(request.get("scenario")), topics(tools_of(request))
    slots = {**SLOTS, "topic": subjects}
    queries: list[str] = []
    for i in range(count_of(request)):
        rng = random.Random(f"{digest}:{i}")
        for _ in range(8):  # a few more draws when it repeats one of this reply
            query = fill(rng.choice(_templates(scenario, subjects, rng)), rng, slots)
            if query not in queries:
                break
        queries.append(query)
    return queries


def intent_of(query: str) -> str:
    return next((name for name, pattern in INTENTS if pattern.search(query)), "other")


def honest(intent: str, rng: random.Random) -> str:
    """Says what cannot be done for this kind of request, and offers what can."""
    kind = intent if intent in CANNOT else "other"
    parts = (rng.choice(OPENERS), rng.choice(CANNOT[kind]), rng.choice(CAN[kind]), rng.choice(CLOSINGS))
    return " ".join(p for p in parts if p)


def direct(intent: str, rng: random.Random) -> str:
    """A general answer to a request no tool is needed for."""
    if intent == "write":
        poem = "\n\n".join(rng.sample(COUPLETS, 2))
        return f"Here's a short piece for you:\n\n{poem}\n\nHappy to change the tone or length."
    firsts, seconds = DIRECT.get(intent, DIRECT["other"])
    parts = (rng.choice(LEADS), rng.choice(firsts), rng.choice(seconds))
    return " ".join(p for p in parts if p)


def plausible_answer(request: dict, digest: str) -> str:
    """The assistant's answer: honest about what it cannot do (no_tools, or an action asked for), else direct."""
    intent, rng = intent_of(_string(request.get("query"))), random.Random(digest)
    if _string(request.get("scenario")) == "irrelevant_tools" and intent not in ACTIONS:
        return direct(intent, rng)
    return honest(intent, rng)


def _request_text(request: dict) -> str:
    return json.dumps(request, ensure_ascii=False, sort_keys=True)


def _call(request: dict, rng: random.Random) -> tuple[str, dict]:
    """A tool a model would wrongly call: an offered one, else one invented for the query; and its arguments."""
    query = _string(request.get("query"))
    names = [t["name"] for t in tools_of(request)]
    name = rng.choice(names) if names else INVENTED.get(intent_of(query), INVENTED["other"])
    return name, {"query": " ".join(query.split()[:6]) or "latest information"}


def _callable(name: str) -> str:
    """``name`` as a dotted Python callable of at least two parts."""
    parts = [re.sub(r"\W", "_", p).lstrip("0123456789") for p in name.split(".")]
    parts = [p for p in parts if p] or ["lookup"]
    return ".".join(parts if len(parts) > 1 else ["tools", *parts])


def react_call(request: dict, answer: str, rng: random.Random) -> str:
    name, arguments = _call(request, rng)
    return f"Thought: I should look this up first.\nAction: {name}\nAction Input: {json.dumps(arguments)}"


def json_call(request: dict, answer: str, rng: random.Random) -> str:
    name, arguments = _call(request, rng)
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{answer}\n\n```json\n{call}\n```" if rng.random() < 0.5 else call


def python_call(request: dict, answer: str, rng: random.Random) -> str:
    name, arguments = _call(request, rng)
    return f"Let me check that for you.\n{_callable(name)}(query={arguments['query']!r})"


def goal_protocol(request: dict, answer: str, rng: random.Random) -> str:
    name, arguments = _call(request, rng)
    return f"goal: {arguments['query']}\nname: {name}\nargs: {json.dumps(arguments, ensure_ascii=False)}"


def tool_calls(request: dict, answer: str, rng: random.Random) -> str:
    name, arguments = _call(request, rng)
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return f'{answer}\n"tool_calls": {json.dumps([call], ensure_ascii=False)}'


def claimed_action(request: dict, answer: str, rng: random.Random) -> str:
    intent = intent_of(_string(request.get("query")))
    return f"{rng.choice(CLAIMS.get(intent, CLAIMS['other']))} {rng.choice(CLOSINGS)}".strip()


def empty(request: dict, answer: str, rng: random.Random) -> str:
    return rng.choice(("", " ", "\n\n"))


def cut_off(request: dict, text: str, rng: random.Random) -> str:
    """Cut where the token limit struck; sent with finish_reason "length"."""
    return text[: rng.randrange(1, len(text))] if len(text) > 1 else text


ANSWER_CORRUPTERS = {f.__name__: f for f in (react_call, json_call, python_call, goal_protocol, tool_calls,
                                             claimed_action, empty, cut_off)}
ANSWER_CORRUPTIONS: tuple[str, ...] = tuple(ANSWER_CORRUPTERS)


def _dump(queries: list[str]) -> str:
    return json.dumps({"queries": queries}, ensure_ascii=False)


def wrong_count(request: dict, queries: list[str], rng: random.Random) -> str:
    index = rng.randrange(len(queries))
    if len(queries) > 1 and rng.random() < 0.5:
        return _dump(queries[:index] + queries[index + 1:])
    return _dump(queries[: index + 1] + queries[index:])


def broken_json(request: dict, queries: list[str], rng: random.Random) -> str:
    content = _dump(queries)
    return content[: len(content) // 2]


def empty_query(request: dict, queries: list[str], rng: random.Random) -> str:
    index = rng.randrange(len(queries))
    return _dump(queries[:index] + [rng.choice(("", " "))] + queries[index + 1:])


def cut_queries(request: dict, queries: list[str], rng: random.Random) -> str:
    return cut_off(request, _dump(queries), rng)


QUERY_CORRUPTERS = {"wrong_count": wrong_count, "broken_json": broken_json, "cut_off": cut_queries,
                    "empty_query": empty_query}
QUERY_CORRUPTIONS: tuple[str, ...] = tuple(QUERY_CORRUPTERS)


def _rng(kind: str, request: dict) -> random.Random:
    return random.Random(f"{kind}\n{_request_text(request)}")


def corrupt_answer(request: dict, answer: str, kind: str) -> tuple[str, str]:
    """``(content, finish_reason)``: the plausible ``answer`` gone wrong the ``kind`` way."""
    content = ANSWER_CORRUPTERS[kind](request, answer, _rng(kind, request))
    return content, "length" if kind == "cut_off" else "stop"


def corrupt_queries(request: dict, queries: list[str], kind: str) -> tuple[str, str]:
    """``(content, finish_reason)``: the plausible ``queries`` (at least one) gone wrong the ``kind`` way."""
    content = QUERY_CORRUPTERS[kind](request, queries, _rng(kind, request))
    return content, "length" if kind == "cut_off" else "stop"


def negative_reply(messages: list[dict], digest: str, rate: float) -> tuple[str, str, str]:
    """``(content, finish_reason, corruption kind or "")`` for a negatives request."""
    request = parse_request(messages) or {}
    corrupted = int(digest[:8], 16) < rate * 16**8
    if is_queries(messages):
        queries = plausible_queries(request, digest)
        if queries and corrupted:
            kind = QUERY_CORRUPTIONS[int(digest[8:16], 16) % len(QUERY_CORRUPTIONS)]
            return (*corrupt_queries(request, queries, kind), kind)
        return _dump(queries), "stop", ""
    answer = plausible_answer(request, digest)
    if corrupted:
        kind = ANSWER_CORRUPTIONS[int(digest[8:16], 16) % len(ANSWER_CORRUPTIONS)]
        return (*corrupt_answer(request, answer, kind), kind)
    return answer, "stop", ""
