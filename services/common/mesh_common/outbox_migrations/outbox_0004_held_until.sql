-- Until when the relay leaves a row alone (mesh_common.relay): set when the
-- broker returned its event as unroutable. Without it such rows, the oldest,
-- headed every claim, and a batch of them stopped every event behind them.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS held_until timestamptz;
