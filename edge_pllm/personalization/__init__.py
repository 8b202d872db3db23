"""Personalization: what of a user's history goes into a request.

strategies  none, recent, rag, profile, plug and their combinations
prompts     how a prompt is written from a request and the history chosen
head        the Persona-Plug head: history vectors and the request into soft tokens
"""
