// The move kernel for given directions, widest param 64-bit, unstaged.
#include "move_launch.cuh"

ADAPEFT_INSTANTIATE_MOVE(false, 64, false)
