"""Sources: a person's own writing read into history items.

importing  notes, HTML, mail and chat exports, documents (`import USER PATH...`)
gitlog     a person's commits from a git repository (`import USER --git REPO`)
"""
