"""Parameter-server data parallelism (Li et al. 2014): parameters and AdamW state live on K
shard actors; workers pull parameters and push gradients, synchronously (BSP) or with bounded
staleness (SSP, Ho et al. 2013). The shard layout (layout.py) and the worker's Strategy
(strategy.py) live here; the shard actor in :mod:`bmray.actors.runtime.param_server_shard`, its
driver-side lifecycle in :mod:`bmray.cluster.param_server`. See docs/param_server.md."""
from bmray.actors.parallel.param_server.layout import (DECAY, MODES, NO_DECAY, ParamServerConfig,
                                                       ShardLayout, Slot, partition)
from bmray.actors.parallel.param_server.strategy import ParameterServer

__all__ = ["DECAY", "MODES", "NO_DECAY", "ParamServerConfig", "ParameterServer", "ShardLayout",
           "Slot", "partition"]
