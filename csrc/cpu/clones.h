// Shared by the CPU loops (lossless_cpu.cpp, batched_cpu.cpp): hot loops compiled once per x86-64 level
// (AVX-512, AVX2, baseline) and picked at load time, since the extension is built without -march=native;
// helpers always inlined into them, so no vector crosses a call boundary.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_CLONES
#endif
#define LORA_INLINE inline __attribute__((always_inline))
