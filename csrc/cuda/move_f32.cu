// The move kernel for given directions, widest param 32-bit, unstaged.
#include "move_launch.cuh"

ADAPEFT_INSTANTIATE_MOVE(false, 32, false)
