from engine import Engine, OrderState
from tests.conftest import flash_campaign


async def test_reserve_and_pay(engine: Engine) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now()))
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    paid = await engine.flash.pay(held.order.order_id, "u1", "pay-1")
    assert paid.state is OrderState.PAID


async def test_cluster_reserve(cluster_engine: Engine) -> None:
    await cluster_engine.campaigns.create(flash_campaign(await cluster_engine.runtime.now()))
    held = await cluster_engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert held.order.state is OrderState.HELD
