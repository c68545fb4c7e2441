-- pgbench script for the demo: a stock movement at a random SKU and location, now and then a
-- reservation, a product rename or a location that is emptied and refilled.
\set sku random(1, 500)
\set loc random(1, 20)
\set delta random(-5, 8)
\set kind random(1, 20)
UPDATE stock_levels
   SET qty_on_hand = greatest(qty_on_hand + :delta, qty_reserved), updated_at = now()
 WHERE sku = 'SKU-' || :sku AND location_code = 'L-' || lpad(:loc::text, 2, '0');
UPDATE stock_levels SET qty_reserved = least(qty_reserved + 1, qty_on_hand)
 WHERE :kind = 1 AND sku = 'SKU-' || :sku AND location_code = 'L-' || lpad(:loc::text, 2, '0');
UPDATE products SET name = 'product ' || :sku || ' rev ' || :delta, updated_at = now()
 WHERE :kind = 2 AND sku = 'SKU-' || :sku;
DELETE FROM stock_levels
 WHERE :kind = 3 AND sku = 'SKU-' || :sku AND location_code = 'L-' || lpad(:loc::text, 2, '0');
INSERT INTO stock_levels (sku, location_code, qty_on_hand, qty_reserved)
SELECT 'SKU-' || :sku, 'L-' || lpad(:loc::text, 2, '0'), 20, 0 WHERE :kind = 4
    ON CONFLICT (sku, location_code) DO NOTHING;
