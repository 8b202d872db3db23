"""Storage: each user's history in a local SQLite database with sqlite-vec.

db            the connection, its extensions and the named, append-only migrations
store         HistoryStore: items, vectors, answers and their feedback, search
items         HistoryItem and NewItem, and what an item's fields may hold
parts         where a long text is cut into parts, each with a vector of its own
search        exact cosine search over vectors held in memory, and its bounded cache
vector_cache  vectors kept by content, so a text is embedded once
"""
