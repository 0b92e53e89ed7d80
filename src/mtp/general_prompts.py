"""The ``general`` prompt set: everyday chat and code requests of many kinds, for distilling heads that
generalize beyond the narrow built-in sets (Python topics, stdlib docstrings, Shakespeare, Ding sentences).

Heads distilled only on those sets lost a third of their acceptance on ordinary requests from elsewhere.
This set crosses ~70 request templates (explain, advise, write, plan, compare, rewrite, reason, code in
eight languages, review, convert) with hand-written topic lists, plus requests built on offline texts
(Ding sentences to rewrite, pydoc paragraphs to summarize, stdlib snippets to explain). Each prompt's split
is fixed by a hash of its text (``split_of("general", prompt)``), so eval prompts never reach training.
"""

from __future__ import annotations

import random

TOPICS = (
    "photosynthesis", "black holes", "the water cycle", "plate tectonics", "vaccines", "the immune system",
    "climate change", "inflation", "compound interest", "the stock market", "supply and demand", "democracy",
    "the French Revolution", "the Roman Empire", "the printing press", "the Industrial Revolution", "the Cold War",
    "the Renaissance", "ancient Egypt", "the Silk Road", "the Moon landing", "the internet", "electric cars",
    "solar panels", "nuclear power", "wind turbines", "recycling", "coral reefs", "rainforests", "honey bees",
    "dinosaurs", "evolution", "DNA", "gravity", "magnetism", "electricity", "rainbows", "volcanoes", "earthquakes",
    "hurricanes", "the seasons", "tides", "the solar system", "Mars", "stars", "the Big Bang", "quantum computing",
    "machine learning", "neural networks", "encryption", "blockchain", "cloud computing", "open-source software",
    "operating systems", "databases", "computer viruses", "password security", "social media", "smartphones",
    "3D printing", "robots", "artificial intelligence", "sleep", "meditation", "exercise", "healthy eating",
    "coffee", "tea", "chocolate", "bread baking", "fermentation", "gardening", "composting", "birdwatching",
    "chess", "football", "the Olympic Games", "jazz", "classical music", "the guitar", "painting", "photography",
    "poetry", "novels", "libraries", "museums", "public transport", "cities", "remote work", "time management",
    "procrastination", "learning a language", "memory", "habits", "friendship", "negotiation", "public speaking",
    "job interviews", "budgeting", "saving money", "renting an apartment", "buying a used car", "first aid",
    "dogs", "cats", "horses", "whales", "octopuses", "mushrooms", "trees", "deserts", "glaciers", "rivers",
    "mountains", "islands", "maps", "calendars", "clocks", "money", "taxes", "insurance", "elections", "courts",
    "human rights", "philosophy", "ethics", "logic", "statistics", "probability", "prime numbers", "fractions",
    "geometry", "algebra", "calculus", "the Pythagorean theorem", "infinity", "zero", "music theory",
    "architecture", "bridges", "skyscrapers", "airplanes", "trains", "ships", "bicycles", "space stations",
)

HOW_TO = (
    "cook rice", "make a cup of tea", "bake chocolate chip cookies", "start running", "learn to swim",
    "write a resume", "prepare for an exam", "fall asleep faster", "reduce stress", "save for a holiday",
    "plant tomatoes", "train a puppy", "clean a laptop keyboard", "back up my files", "choose a password",
    "set up a home Wi-Fi network", "speed up a slow computer", "learn to play the piano", "make new friends in a city",
    "give a good presentation", "write a cover letter", "ask for a raise", "organize my desk", "stay focused",
    "keep houseplants alive", "fix a flat bicycle tire", "make pancakes", "brew coffee without a machine",
    "learn Python", "read more books", "start a journal", "plan a wedding", "move to another country",
    "negotiate rent", "pack for a long flight", "take better photos with a phone", "wake up earlier",
    "write a thank-you note", "apologize to a friend", "study a new language every day", "start a podcast",
    "remove a coffee stain", "care for a sourdough starter", "prepare for a marathon", "teach a child to read",
)

PEOPLE = ("my manager", "a colleague", "my landlord", "a customer", "my teacher", "a new client", "my neighbour",
          "the team", "a friend", "the school principal", "a hotel", "a job applicant")
SUBJECTS = ("a delayed project", "a meeting next week", "a broken heater", "a refund", "a missed deadline",
            "a new office policy", "a birthday party", "a job offer", "a noisy party", "a product launch",
            "a holiday request", "feedback on a report")
PRODUCTS = ("a reusable water bottle", "noise-cancelling headphones", "a standing desk", "a smart thermostat",
            "a hiking backpack", "an electric toothbrush", "a coffee grinder", "a children's book",
            "a budgeting app", "a yoga mat", "a solar phone charger", "handmade soap")
CITIES = ("Paris", "Tokyo", "New York", "Rome", "Barcelona", "Berlin", "Lisbon", "Istanbul", "Mexico City",
          "Cape Town", "Sydney", "Kyoto", "Prague", "Vienna", "Edinburgh", "Buenos Aires", "Seoul", "Amsterdam")
PAIRS = (("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("renting", "buying a home"),
         ("Python", "JavaScript"), ("SQL", "NoSQL databases"), ("solar", "wind power"), ("books", "films"),
         ("running", "cycling"), ("email", "instant messaging"), ("Linux", "Windows"), ("TCP", "UDP"),
         ("lists", "tuples in Python"), ("stocks", "bonds"), ("summer", "winter"), ("cities", "the countryside"),
         ("electric cars", "petrol cars"), ("git merge", "git rebase"), ("REST", "GraphQL"), ("paper", "e-books"))
CHARACTERS = ("a lonely robot", "a curious cat", "an old lighthouse keeper", "a young wizard", "a time traveller",
              "a detective", "a dragon who is afraid of fire", "a girl who can talk to birds", "a retired astronaut",
              "a baker in a small town", "two rival chess players", "a lost tourist")
EVENTS = ("finds a mysterious key", "wakes up in the future", "loses their memory", "wins a strange contest",
          "meets their double", "discovers a hidden door", "has one day to save the village",
          "receives a letter from the past", "gets stuck in an elevator", "learns to fly")
THINGS = ("a coffee shop", "a startup", "a pet hamster", "a bakery", "a podcast about science", "a hiking club",
          "a fantasy kingdom", "a robot vacuum", "a book club", "a board game")

LANGUAGES = ("Python", "JavaScript", "TypeScript", "Java", "C", "C++", "Go", "Rust", "Bash", "Ruby")
CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "sorts a list of numbers with merge sort", "counts the words in a text", "finds the largest element of an array",
    "removes duplicates from a list", "checks whether a string is a palindrome", "converts Celsius to Fahrenheit",
    "computes the factorial of a number", "merges two sorted arrays", "implements binary search",
    "reads a CSV file and prints each row", "computes the average of a list", "validates an email address",
    "flattens a nested list", "counts the vowels in a string", "generates a random password",
    "returns the greatest common divisor of two numbers", "transposes a matrix", "implements a stack",
    "implements a queue with two stacks", "parses a date string", "finds the most common word in a text",
    "checks whether two strings are anagrams", "rotates an array by k positions", "computes a running sum",
    "converts a number to Roman numerals", "implements a simple linked list", "finds all pairs that sum to a target",
    "capitalizes the first letter of every word", "computes the power set of a list", "implements bubble sort",
    "reads a JSON file and prints a field", "formats a file size in KB, MB or GB",
    "implements FizzBuzz", "computes the distance between two points", "groups a list of words by length",
    "checks whether brackets in a string are balanced", "implements an LRU cache",
)
SQL_TASKS = ("returns the ten most recent orders", "counts customers per country", "finds duplicate emails",
             "computes the total sales per month", "lists employees earning more than their manager",
             "joins orders with customers and shows names", "deletes rows older than one year",
             "finds products that were never ordered")
SNIPPETS = (
    "for i in range(len(xs)):\n    if xs[i] == target:\n        return i\nreturn -1",
    "def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)",
    "result = [x * x for x in numbers if x % 2 == 0]",
    "const total = items.reduce((sum, item) => sum + item.price, 0);",
    "with open(path) as fh:\n    lines = [line.strip() for line in fh if line.strip()]",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 5;",
    "while left <= right:\n    mid = (left + right) // 2\n    if a[mid] < x:\n        left = mid + 1\n    else:\n        right = mid - 1",
    "def average(xs):\n    return sum(xs) / len(xs)",
    "for (int i = 0; i <= n; i++) { sum += a[i]; }",
    "d = {}\nfor w in words:\n    d[w] = d.get(w, 0) + 1",
    "function debounce(fn, ms) { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; }",
    "import random\nprint(random.choice(['rock', 'paper', 'scissors']))",
)

TEMPLATES = (
    ("Explain {topic} in simple terms.", {"topic": TOPICS}),
    ("What is {topic}?", {"topic": TOPICS}),
    ("Give me three interesting facts about {topic}.", {"topic": TOPICS}),
    ("Write a short paragraph about {topic} for a school newsletter.", {"topic": TOPICS}),
    ("Explain {topic} to a ten-year-old.", {"topic": TOPICS}),
    ("What are the pros and cons of {topic}?", {"topic": TOPICS}),
    ("Summarize the history of {topic} in a few sentences.", {"topic": TOPICS}),
    ("Write a quiz with three questions about {topic}.", {"topic": TOPICS}),
    ("Write a haiku about {topic}.", {"topic": TOPICS}),
    ("How do I {task}?", {"task": HOW_TO}),
    ("Give me step-by-step instructions to {task}.", {"task": HOW_TO}),
    ("What are some tips to {task}?", {"task": HOW_TO}),
    ("I want to {task}. Where should I start?", {"task": HOW_TO}),
    ("Write a short email to {person} about {subject}.", {"person": PEOPLE, "subject": SUBJECTS}),
    ("Write a polite message to {person} about {subject}.", {"person": PEOPLE, "subject": SUBJECTS}),
    ("Write a product description for {product}.", {"product": PRODUCTS}),
    ("Write a short advertisement for {product}.", {"product": PRODUCTS}),
    ("Plan a three-day trip to {city}.", {"city": CITIES}),
    ("What should I see in {city}?", {"city": CITIES}),
    ("Make a packing list for a week in {city}.", {"city": CITIES}),
    ("Compare {a} and {b}.", {"pair": PAIRS}),
    ("Which is better, {a} or {b}? Explain briefly.", {"pair": PAIRS}),
    ("What is the difference between {a} and {b}?", {"pair": PAIRS}),
    ("Write a short story about {character} who {event}.", {"character": CHARACTERS, "event": EVENTS}),
    ("Write the opening paragraph of a novel about {character} who {event}.",
     {"character": CHARACTERS, "event": EVENTS}),
    ("Suggest five names for {thing}.", {"thing": THINGS}),
    ("Write a slogan for {thing}.", {"thing": THINGS}),
    ("Write a {lang} function that {task}.", {"lang": LANGUAGES, "task": CODE_TASKS}),
    ("How do I write a program in {lang} that {task}?", {"lang": LANGUAGES, "task": CODE_TASKS}),
    ("Write a {lang} function that {task}, with comments.", {"lang": LANGUAGES, "task": CODE_TASKS}),
    ("Show me a {lang} example that {task} and explain it.", {"lang": LANGUAGES, "task": CODE_TASKS}),
    ("Write a SQL query that {sql}.", {"sql": SQL_TASKS}),
    ("Explain what this code does:\n\n{snippet}", {"snippet": SNIPPETS}),
    ("Is there a bug in this code? Explain.\n\n{snippet}", {"snippet": SNIPPETS}),
    ("Rewrite this code to be more readable:\n\n{snippet}", {"snippet": SNIPPETS}),
    ("Add comments to this code:\n\n{snippet}", {"snippet": SNIPPETS}),
    ("Write unit tests for this code:\n\n{snippet}", {"snippet": SNIPPETS}),
    ("Translate this code into {lang}:\n\n{snippet}", {"lang": LANGUAGES, "snippet": SNIPPETS}),
)


def _numeric_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 12)
        out.append(rng.choice((
            f"If {a} apples cost ${b}, how much do {a * c} apples cost?",
            f"What is {a} times {b}? Show your work.",
            f"Solve for x: {a}x + {b} = {a * c + b}.",
            f"A train travels {a * 10} km in {c} hours. What is its average speed?",
            f"I have {a} cookies and share them equally among {c} friends. How many does each get, and how many are "
            f"left?",
            f"Convert {a * 100} minutes into hours and minutes.",
            f"What is {c * 5} percent of {b * 20}?",
            f"Is {a * b + 1} a prime number? Explain.",
        )))
    return out


def _text_prompts(rng: random.Random) -> list[str]:
    """Requests built on offline texts: rewrite Ding example sentences, summarize pydoc paragraphs."""
    from mtp.data import CorpusUnavailable, translation_pairs

    out = []
    try:
        english = [en for _, en in translation_pairs()]
    except CorpusUnavailable:
        english = []
    for en in rng.sample(english, min(len(english), 600)):
        out.append(rng.choice((f"Rewrite this sentence more formally: {en}",
                               f"Rewrite this sentence in simpler words: {en}",
                               f"Correct any mistakes in this sentence and explain: {en}",
                               f"Continue this story in a few sentences: {en}",
                               f"Translate into French: {en}", f"Translate into Spanish: {en}",
                               f"Write a short dialogue that starts with: \"{en}\"")))
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = " ".join(topics[name].split())[:600]
        if len(text) > 200:
            out.append(f"Summarize this in two sentences:\n\n{text}")
    return out


def general_prompts(seed: int = 0) -> list[str]:
    """Every prompt of the set (both splits), deterministic."""
    rng = random.Random(seed)
    prompts = []
    for template, slots in TEMPLATES:
        if "pair" in slots:
            combos = [{"a": a, "b": b} for a, b in slots["pair"]]
        else:
            keys = list(slots)
            combos = [{}]
            for k in keys:
                combos = [dict(c, **{k: v}) for c in combos for v in slots[k]]
        rng.shuffle(combos)
        prompts += [template.format(**c) for c in combos[:120]]
    prompts += _numeric_prompts(rng, 300)
    prompts += _text_prompts(rng)
    return list(dict.fromkeys(prompts))  # drop duplicates, keep order


# ----------------------------------------------------------------------------- varied length and style

PROGRAMMING = (
    "recursion", "closures", "decorators in Python", "generators", "async/await", "threads and processes",
    "garbage collection", "pointers", "hash tables", "binary trees", "big-O notation", "dynamic programming",
    "regular expressions", "unit testing", "dependency injection", "REST APIs", "HTTP status codes", "CORS",
    "JSON", "YAML", "Docker containers", "Kubernetes", "git branches", "continuous integration", "SQL joins",
    "database indexes", "transactions", "caching", "load balancing", "microservices", "type hints in Python",
    "virtual environments", "list comprehensions", "lambda functions", "object-oriented programming",
    "inheritance", "interfaces", "immutability", "functional programming", "event loops", "websockets",
    "OAuth", "hashing passwords", "SQL injection", "memory leaks", "race conditions", "deadlocks", "linked lists",
    "sorting algorithms", "graph search", "the shell", "environment variables", "cron jobs", "logging",
)
OPENERS = ("", "", "", "Hi! ", "Hello, ", "Quick question: ", "Can you help me? ", "I'm a beginner. ",
           "I have an exam tomorrow. ", "My friend asked me this and I didn't know: ", "Please ", "Hey, ")
STYLES = (
    "", "", "", " Answer in one sentence.", " Keep it short.", " Be concise.", " Use bullet points.",
    " Explain it like I'm five.", " Give an example.", " Use a numbered list.", " Write about 150 words.",
    " Answer in two or three sentences.", " Use a friendly tone.", " Use a formal tone.", " Include a table.",
    " Then summarize your answer in one line.", " Give me the answer first, then the explanation.",
    " Avoid jargon.", " Use an analogy.", " Write it as a short dialogue.", " Respond in Markdown.",
)
SHORT = ("{topic}?", "what is {topic}", "{topic} explained", "define {topic}", "{topic} pros cons",
         "how does {topic} work", "why {topic}", "tell me about {topic}")
BASE = (
    "Explain {topic}.", "What is {topic} and why does it matter?", "How does {topic} work?",
    "What are common misconceptions about {topic}?", "Write a blog post introduction about {topic}.",
    "What should a beginner know about {topic}?", "Give me a study plan to learn about {topic} in a week.",
    "What are the most important things to know about {topic}?", "Write a tweet about {topic}.",
    "Create a lesson outline about {topic} for high school students.", "Describe {topic} in three sentences.",
    "What questions would an expert ask about {topic}?", "Write a short poem about {topic}.",
    "What is the history of {topic}?", "How is {topic} used in everyday life?",
)
LONG = (
    "I'm preparing a short talk for my team about {topic}. They are smart but not experts. Can you outline the "
    "main points I should cover, in what order, and suggest one example for each?",
    "I have been reading about {topic} but I keep getting confused. Could you explain it from the basics, "
    "then tell me which parts people usually find hard and how to think about them?",
    "My ten-year-old asked me about {topic} at dinner and I gave a bad answer. How could I explain it to a "
    "child in a way that is correct but simple? Please include a small experiment or example if you can.",
    "Write an FAQ about {topic} with five questions and short answers, for a website aimed at the general public.",
    "I need to write a one-page report about {topic} for a class. Give me a structure with headings and a "
    "sentence or two about what goes under each heading.",
)


def varied_prompts(seed: int = 1) -> list[str]:
    """Requests of varied length and style: terse search-like queries, plain questions with an opener and a
    style or length constraint, and long requests with context; over everyday and programming topics."""
    rng = random.Random(seed)
    topics = list(TOPICS) + list(PROGRAMMING)
    prompts = []
    for topic in topics:
        for template in rng.sample(SHORT, 2):
            prompts.append(template.format(topic=topic))
        for template in rng.sample(BASE, 5):
            body = template.format(topic=topic)
            opener = rng.choice(OPENERS)
            body = body[0].lower() + body[1:] if opener.endswith((", ", "Please ")) else body
            prompts.append(f"{opener}{body}{rng.choice(STYLES)}")
        prompts.append(rng.choice(LONG).format(topic=topic))
    for task in HOW_TO:
        opener = rng.choice(OPENERS)
        prompts.append(f"{opener}{'h' if opener.endswith((', ', 'Please ')) else 'H'}ow can I {task}?{rng.choice(STYLES)}")
    for lang in LANGUAGES:
        for task in rng.sample(CODE_TASKS, 12):
            opener = rng.choice(OPENERS)
            prompts.append(f"{opener}{'i' if opener.endswith((', ', 'Please ')) else 'I'} need a {lang} function that "
                           f"{task}.{rng.choice(STYLES)}")
        for topic in rng.sample([t for t in PROGRAMMING if " in " not in t], 6):
            prompts.append(f"Give a small {lang} example of {topic} and explain it.")
    return list(dict.fromkeys(prompts))
