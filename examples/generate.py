"""Compile the default model and generate, from Python."""
import ffc

art = ffc.compile("smollm2-135m", "smol.ffc")
llm = ffc.load(art)
out = llm.generate(["Hello", "The capital of France is"], max_new_tokens=32)
for text in out.texts:
    print(repr(text))
for piece in llm.stream("Once upon a time", max_new_tokens=64):
    print(piece, end="", flush=True)
print()
print(llm.chat("Give me three tips for Tokyo", max_new_tokens=128, temperature=0.7, seed=1))
