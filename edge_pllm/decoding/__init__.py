"""Decoding: how an answer is drawn from the prompts personalization prepared.

decoders   a strategy spec resolved into a plan: prompts to prepare and a decoder
consensus  several sampled answers, the one the others agree with most
beam       beam search over token ids
answers    where a generated answer ends and what of it counts
"""
