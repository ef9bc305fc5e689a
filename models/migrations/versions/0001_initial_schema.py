"""initial schema

Revision ID: 0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('chat_group',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('owner_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_chat_group')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    op.create_table('conversation',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('conversation_id', sa.String(length=100), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('target_id', sa.BigInteger(), nullable=False),
    sa.Column('is_group', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('last_message', sa.Text(), nullable=True),
    sa.Column('last_message_time', sa.BigInteger(), nullable=True),
    sa.Column('last_msg_id', sa.BigInteger(), nullable=True),
    sa.Column('unread_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversation')),
    sa.UniqueConstraint('user_id', 'conversation_id', name='uk_user_conversation'),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.create_index('idx_user', ['user_id', 'updated_at'], unique=False)

    op.create_table('device',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('platform', sa.String(length=16), nullable=False),
    sa.Column('token', sa.String(length=255).with_variant(mysql.VARCHAR(255, collation='utf8mb4_bin'), 'mysql'), nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_device')),
    sa.UniqueConstraint('token', name=op.f('uq_device_token')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.create_index('idx_device_user', ['user_id'], unique=False)

    op.create_table('group_member',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('group_id', sa.BigInteger(), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('role', sa.String(length=16), server_default='member', nullable=False),
    sa.Column('joined_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_group_member')),
    sa.UniqueConstraint('group_id', 'user_id', name=op.f('uq_group_member_group_id_user_id')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('group_member', schema=None) as batch_op:
        batch_op.create_index('idx_member_user', ['user_id'], unique=False)

    op.create_table('message',
    sa.Column('id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('conversation_id', sa.String(length=100), nullable=False),
    sa.Column('sender_id', sa.BigInteger(), nullable=False),
    sa.Column('receiver_id', sa.BigInteger(), nullable=True),
    sa.Column('group_id', sa.BigInteger(), nullable=True),
    sa.Column('client_msg_id', sa.String(length=64).with_variant(mysql.VARCHAR(64, collation='utf8mb4_bin'), 'mysql'), nullable=False),
    sa.Column('message_type', sa.String(length=20), server_default='text', nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('extra', sa.JSON(), nullable=True),
    sa.Column('is_group', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('timestamp', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.SmallInteger(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message')),
    sa.UniqueConstraint('sender_id', 'client_msg_id', name=op.f('uq_message_sender_id_client_msg_id')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.create_index('idx_conversation', ['conversation_id', 'timestamp'], unique=False)
        batch_op.create_index('idx_receiver', ['receiver_id', 'status'], unique=False)
        batch_op.create_index('idx_sender', ['sender_id', 'timestamp'], unique=False)

    op.create_table('offline_message_index',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('conversation_id', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.Column('synced', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('synced_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_offline_message_index')),
    sa.UniqueConstraint('user_id', 'message_id', name=op.f('uq_offline_message_index_user_id_message_id')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('offline_message_index', schema=None) as batch_op:
        batch_op.create_index('idx_offline_message', ['message_id'], unique=False)
        batch_op.create_index('idx_user_synced', ['user_id', 'synced', 'created_at'], unique=False)

    op.create_table('push_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('push_type', sa.String(length=20), nullable=False),
    sa.Column('push_status', sa.String(length=20), nullable=False),
    sa.Column('target', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.BigInteger(), nullable=True),
    sa.Column('priority', sa.SmallInteger(), server_default='5', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('push_time', sa.DateTime(), nullable=True),
    sa.Column('error_msg', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_push_log')),
    sa.UniqueConstraint('message_id', 'user_id', 'target', name=op.f('uq_push_log_message_id_user_id_target')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    with op.batch_alter_table('push_log', schema=None) as batch_op:
        batch_op.create_index('idx_push_message', ['message_id'], unique=False)
        batch_op.create_index('idx_user_status', ['user_id', 'push_status'], unique=False)

    op.create_table('push_setting',
    sa.Column('user_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('channels', sa.JSON(), nullable=False),
    sa.Column('email', sa.String(length=255), nullable=True),
    sa.Column('muted_conversations', sa.JSON(), nullable=False),
    sa.Column('dnd_start', sa.String(length=5), nullable=True),
    sa.Column('dnd_end', sa.String(length=5), nullable=True),
    sa.Column('time_zone', sa.String(length=64), server_default='UTC', nullable=False),
    sa.Column('preview', sa.Boolean(), server_default='1', nullable=False),
    sa.Column('updated_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('user_id', name=op.f('pk_push_setting')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )
    op.create_table('user',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('is_admin', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user')),
    sa.UniqueConstraint('username', name=op.f('uq_user_username')),
    mysql_charset='utf8mb4',
    mysql_collate='utf8mb4_unicode_ci',
    mysql_engine='InnoDB'
    )


def downgrade() -> None:
    op.drop_table('user')
    op.drop_table('push_setting')
    with op.batch_alter_table('push_log', schema=None) as batch_op:
        batch_op.drop_index('idx_user_status')
        batch_op.drop_index('idx_push_message')

    op.drop_table('push_log')
    with op.batch_alter_table('offline_message_index', schema=None) as batch_op:
        batch_op.drop_index('idx_user_synced')
        batch_op.drop_index('idx_offline_message')

    op.drop_table('offline_message_index')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('idx_sender')
        batch_op.drop_index('idx_receiver')
        batch_op.drop_index('idx_conversation')

    op.drop_table('message')
    with op.batch_alter_table('group_member', schema=None) as batch_op:
        batch_op.drop_index('idx_member_user')

    op.drop_table('group_member')
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_index('idx_device_user')

    op.drop_table('device')
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_index('idx_user')

    op.drop_table('conversation')
    op.drop_table('chat_group')
