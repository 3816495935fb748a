import asyncio
import json

async def subscribe():
    reader, writer = await asyncio.open_connection('localhost', 8888)
    msg = json.dumps({"action": "subscribe", "topic": "news"})
    writer.write(msg.encode())
    await writer.drain()
    while True:
        data = await reader.read(1024)
        if not data:
            break
        print("Received:", json.loads(data.decode()))
    writer.close()
    await writer.wait_closed()

# Run in another script or terminal:
# asyncio.run(subscribe())
