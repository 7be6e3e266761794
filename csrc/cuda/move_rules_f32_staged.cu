// The move kernel for directions formed by optimizer rules, widest param 32-bit, chunks staged in shared memory.
#include "move_launch.cuh"

ADAPEFT_INSTANTIATE_MOVE(true, 32, true)
