// The portable kernels: the baseline ISA of the compiler's target (SSE2 on x86-64),
// 4-float vectors.
#include "kernels.h"

#define JS_NS generic
#define JS_NAME "generic"
#define JS_TABLE generic_kernels
#define JS_W 4
#define JS_MR 4
#define JS_NV 3
#define JS_SR 2
#define JS_SC 4
#include "kernels.inc"
