"""Llama-2-7B-chat as a Cog model package. Importing it loads no torch and compiles nothing."""
